"""Parquet files: the wanted columns, with a truncated or foreign file reported as such."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from twotower.errors import DataError

from .table import Table, missing_column_error


def load_parquet(path: Path, wanted: list[tuple[str, str, str]], names: list[str]) -> Table:
    try:
        with open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            found = list(pf.schema_arrow.names)
            for col, role, param in wanted:
                if col not in found:
                    raise missing_column_error(path, col, role, param, found, "schema", None)
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
