"""``long``: a bench already in the long format (parquet or jsonl): validated and copied, so users
can check their own data. Prices: ``--catalog``, else fitted to ``cost_usd``, else the default
catalogue."""

from __future__ import annotations

from r2ray.bench.formats.common import AdapterOptions, Converted, SourcePart
from r2ray.bench.io import read_table_rows

SUFFIXES = (".parquet", ".jsonl", ".json")


def read(files: list[str], options: AdapterOptions) -> Converted:
    return Converted([SourcePart(uri, *read_table_rows(uri)) for uri in files])
