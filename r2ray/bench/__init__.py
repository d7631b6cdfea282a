"""Bench data: the long format, its readers and writers, adapters and the synthetic world."""

from r2ray.bench.io import TableWriter, iter_batches, read_bench, read_table, write_table
from r2ray.bench.schema import BENCH_SCHEMA, BenchError, conform, validate_bench

__all__ = [
    "BENCH_SCHEMA", "BenchError", "TableWriter", "conform", "iter_batches", "read_bench",
    "read_table", "validate_bench", "write_table",
]
