"""Reading tabular data (CSV, gzipped CSV, Parquet) with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from insitu.errors import DataFormatError

__all__ = ["read_table"]

_CSV = (".csv", ".csv.gz", ".tsv")
_PARQUET = (".parquet", ".pq")


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a data file. CSV columns are read as text; the schema decides their types.

    Reading as text keeps identifiers intact (leading zeros, long digit strings that a
    float would round) until they are pseudonymized.

    Raises:
        DataFormatError: the file is missing, of an unknown kind, unreadable or empty.

    """
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise DataFormatError(f"data file {path} does not exist")
    try:
        if name.endswith(_CSV):
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                na_values=[""],
                sep="\t" if name.endswith(".tsv") else ",",
                skipinitialspace=True,
            )
        elif name.endswith(_PARQUET):
            frame = pd.read_parquet(path)
        else:
            raise DataFormatError(
                f"{path}: unknown data format; use .csv, .csv.gz, .tsv, .parquet or .pq"
            )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataFormatError(f"cannot read {path}: {exc}") from exc
    if frame.empty:
        raise DataFormatError(f"{path} holds no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame
