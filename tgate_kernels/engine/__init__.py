"""The engine: installing T-GATE on a pipeline, following its generations, and the guidance and
caches its hooks share. Nothing here imports the tools."""
