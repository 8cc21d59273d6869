"""Tools over the engine: the command line, benchmarks, generation jobs, evaluation and the micro
world. The engine imports nothing from here."""
