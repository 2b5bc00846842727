"""Benchmarks run by launch/bench.py; each module exposes add_parser(sub) and run(args) -> dict."""
