"""The commit's counts of the quarantine and deferred folders (no Ray)."""

import pyarrow as pa

from r2ray.batch.backlog import QUARANTINE_SCHEMA
from r2ray.batch.job import _count_rows, quarantine_counts
from r2ray.bench.io import write_table


def test_counts_of_absent_empty_and_filled_folders(tmp_path):
    absent, empty = tmp_path / "absent", tmp_path / "empty"
    empty.mkdir()   # a write a killed task never finished: only its temporary file is left
    (empty / "part-0.parquet.tmp-123-abcd").write_bytes(b"PAR1 half")
    for folder in (absent, empty):   # before the fix: the empty one raised FileNotFoundError
        assert _count_rows(str(folder)) == 0
        assert quarantine_counts(str(folder)) == {"records": 0, "rows": 0, "duplicates": 0,
                                                  "files": 0}
    records = [{"source": "a.jsonl", "row": 2, "query_id": "q", "reason": "duplicate of row 1",
                "raw": "{}"},
               {"source": "b.parquet", "row": None, "query_id": None, "reason": "unreadable",
                "raw": None}]
    write_table(pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA),
                str(empty / "part-1.parquet"))
    assert _count_rows(str(empty)) == 2
    assert quarantine_counts(str(empty)) == {"records": 2, "rows": 1, "duplicates": 1, "files": 1}
