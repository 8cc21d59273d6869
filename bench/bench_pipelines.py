"""Regenerate the numbers of ``bench/RESULTS.md``.

    python bench/bench_pipelines.py            # = tgate-kernels bench --out bench/out
    python bench/bench_pipelines.py --resolution 256 --steps 25 --repeats 3   # any bench option

Every option of ``tgate-kernels bench`` is accepted and passed through; see
``tgate-kernels bench --help``.
"""

import sys

from tgate_kernels.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
