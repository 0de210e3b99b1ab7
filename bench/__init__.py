"""Benchmarks: tidegate against the naive submit-all runner, fixed batches with a
barrier and the raw Dask ``as_completed`` window, on named scenarios (``python -m bench``,
``make bench``; docs/BENCHMARKS.md is the report)."""
