"""Atomic writes, checksums and checked parquet reads (brainfoundry.io)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from brainfoundry.errors import InputError
from brainfoundry.io import read_parquet_verified, sha256_file, verify_sha256, write_parquet_atomic


def flip_byte(path: str | Path, column: str, row_group: int = 0, bit: int = 0x01) -> int:
    """Flip one bit in the middle of ``column``'s data in ``row_group`` (as a failing disk would).

    The low bit keeps float values finite, so only a checksum can tell. Returns the byte offset.
    """
    path = Path(path)
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunks = [meta.column(i) for i in range(meta.num_columns)]
    chunk = next(c for c in chunks if c.path_in_schema.split(".")[0] == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    offset = start + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))
    return offset


def _table(n: int = 2000) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({"a": rng.normal(size=n).astype(np.float32), "b": np.arange(n, dtype=np.int64)})


def test_write_parquet_atomic_returns_the_files_sha256_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.parquet"
    digest = write_parquet_atomic(_table(), path, compression="zstd")
    assert digest == sha256_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]
    assert read_parquet_verified(path, "table", sha256=digest).equals(_table())


def test_a_flipped_bit_is_a_checksum_mismatch_naming_file_and_record(tmp_path):
    path = tmp_path / "x.parquet"
    digest = write_parquet_atomic(_table(), path)
    flip_byte(path, "a")
    assert pq.read_table(path).num_rows == 2000  # pyarrow alone reads changed values without a word
    with pytest.raises(InputError, match=r"x\.parquet: checksum mismatch.*recorded in side\.json") as err:
        read_parquet_verified(path, "table", sha256=digest, recorded_in="side.json")
    assert err.value.source == str(path)
    with pytest.raises(InputError, match="checksum mismatch"):
        verify_sha256(path, digest, "manifest.parquet")


def test_page_checksums_catch_a_flipped_bit_without_a_recorded_sha256(tmp_path):
    path = tmp_path / "x.parquet"
    write_parquet_atomic(_table(), path)
    flip_byte(path, "a")
    with pytest.raises(InputError, match=r"x\.parquet: corrupt table: parquet page checksum mismatch"):
        read_parquet_verified(path, "table")


def test_unreadable_or_missing_parquet_is_named(tmp_path):
    with pytest.raises(InputError, match=r"nope\.parquet: table not found"):
        read_parquet_verified(tmp_path / "nope.parquet", "table")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"bad\.parquet: cannot read the table"):
        read_parquet_verified(bad, "table")
