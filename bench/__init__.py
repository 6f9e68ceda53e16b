"""Benchmarks (``python -m bench.NAME``) and the trace loaders they and replays share."""
