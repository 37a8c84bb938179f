"""CWB profiler: per-unit forward/backward time and memory of a model, measured with torch."""
