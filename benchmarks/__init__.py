"""Benchmarks and evaluations of the service: tools beside the product, run through
``manage.py memfuse_bench`` (the product never imports them)."""
