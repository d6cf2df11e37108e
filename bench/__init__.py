"""Benchmark of floydd's /expose proxy beside HAProxy and direct access; see docs/benchmarks.md."""
