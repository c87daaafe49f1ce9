"""Observability: per-rank timers and their HDF5 files, timer marks inside CUDA graphs, the profiler window,
and the merge of a run's rank files. Constants shared with the readers in traces/ live here (no torch import)."""

SYNC_PREFIX = "spmd.sync:"  # the profiler window's clock marker: a range named SYNC_PREFIX + perf_counter_ns
