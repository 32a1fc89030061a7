"""Benchmarks run by ``specserve bench <name>``: each prints JSON and a one-line summary."""
