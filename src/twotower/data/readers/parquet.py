"""Parquet files: the wanted columns, with a truncated or foreign file reported as such."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from twotower.errors import DataError

from .files import read_limits_now
from .table import CONFIG_KEYS, Table, duplicate_column_error, missing_column_error


def _single_valued(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return not (pa.types.is_nested(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or pa.types.is_fixed_size_binary(kind))


def _check_type(path: Path, col: str, role: str, param: str, kind: pa.DataType) -> None:
    """Ids, timestamps, weights and titles are single values: a list, struct, map or binary column
    was read as its text (``"[1, 2]"``), so a list column of ids became one string id per distinct
    list and a run trained on one user and one item. Feature columns may hold lists (several values)."""
    if role.endswith("feature") or _single_valued(kind):
        return
    key = CONFIG_KEYS.get((role, param), param)
    what = "numbers" if role in ("timestamp", "weight") else "strings" if role.endswith("title") else "integers or strings"
    raise DataError(path, f"column {col!r} ({role}) has Parquet type {kind}, not one value per row",
                    f"{role} values must be {what}, one per row: write the column with such a type, or map the "
                    f"{role} to another column (config: data.{key})", where="schema")


def check_parquet_size(path: Path, pf: pq.ParquetFile, names: list[str]) -> None:
    """Refuse, from the file's metadata and before reading, columns that decompress to more than
    ``data.max_decompressed_mb`` (a Parquet decompression bomb is refused without being expanded)."""
    limit = read_limits_now().max_bytes
    md = pf.metadata
    total = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema.split(".")[0] in names:
                total += max(int(col.total_uncompressed_size or 0), 0)
    if total > limit:
        raise DataError(path, f"the columns to read decompress to {total / 2**20:,.0f} MiB, more than the "
                              f"{limit >> 20:,} MiB limit (data.max_decompressed_mb)",
                        "if the file is genuine, raise data.max_decompressed_mb", where="metadata")


def load_parquet(path: Path, wanted: list[tuple[str, str, str]], names: list[str]) -> Table:
    try:
        with open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            found = list(pf.schema_arrow.names)
            for col, role, param in wanted:
                if col not in found:
                    raise missing_column_error(path, col, role, param, found, "schema", None)
                if found.count(col) > 1:
                    raise duplicate_column_error(path, col, [i for i, c in enumerate(found) if c == col], "schema")
                _check_type(path, col, role, param, pf.schema_arrow.field(col).type)
            check_parquet_size(path, pf, names)
            try:
                table = pf.read(columns=names)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(
                    path,
                    f"cannot read the Parquet data ({exc})",
                    "the file is truncated or corrupt; write it again",
                    where="data pages",
                ) from None
    except DataError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            path,
            f"cannot read the Parquet file ({exc})",
            "the file is truncated or not Parquet (interrupted copy?); write or fetch it again",
            where="footer",
        ) from None
    if table.num_rows == 0:
        raise DataError(
            path,
            "Parquet file has columns but no rows",
            "check that the right file was given",
            where="row index 0",
        )
    columns = {}
    for col in names:
        columns[col] = table.column(col).to_pandas()
    return Table(path, columns, table.num_rows, lambda row: f"row index {row}", found)
