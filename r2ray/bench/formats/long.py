"""``long``: a bench already in the long format (parquet or jsonl): validated and copied, so users
can check their own data. Prices: ``--catalog``, else fitted to ``cost_usd``, else the default
catalogue."""

from __future__ import annotations

import numpy as np

from r2ray.bench.formats.common import AdapterOptions, Converted, SourcePart
from r2ray.bench.io import read_table

SUFFIXES = (".parquet", ".jsonl", ".json")


def read(files: list[str], options: AdapterOptions) -> Converted:
    parts = []
    for uri in files:
        table = read_table(uri)
        parts.append(SourcePart(uri, table, np.arange(1, table.num_rows + 1)))
    return Converted(parts)
