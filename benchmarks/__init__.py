"""Longhaul benchmarks: ``make bench`` (``python -m benchmarks``) measures, ``python -m
benchmarks.report`` turns the JSON into docs/benchmarks.md and its plots.

Results are figures, never assertions: nothing here is imported by the test suite.
"""
