"""Run traces: merge per-rank HDF5 files (traces.merge) and report on them (traces.report)."""
