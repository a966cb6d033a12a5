"""Batch prediction over files (``insitu predict``): streamed, so any size fits in memory.

The input is read in chunks (``pandas.read_csv(chunksize=...)``, or
``pyarrow.parquet.ParquetFile.iter_batches``), each chunk is checked against the model
card, run, and its predictions appended to a temporary file beside the output; the
temporary file is renamed over the output only when every chunk succeeded (fsync first),
so a failure leaves no half-written output. Memory use is one chunk, whatever the size
of the file.

Columns: with a data schema, records are encoded by :class:`insitu.data.FeatureEncoder`
(the same encoding as training); without one, the file must hold the model's input
columns as numbers, in order (all columns, or those named in ``columns``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu._atomic import fsync_dir
from insitu.errors import DataFormatError, InvalidInputError, MissingDependencyError

if TYPE_CHECKING:
    import pandas as pd

    from insitu.data import DataSchema
    from insitu.runtime._runtime import ModelRuntime

__all__ = ["predict_file"]

CHUNK_ROWS = 4096


def _pandas() -> Any:
    # pandas reads the files; a device install without it can serve, not predict files.
    try:
        import pandas
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            "predicting a file needs pandas, which this install lacks; install the extra "
            "that brings it: pip install 'insitu[data]'"
        ) from exc
    return pandas


def _chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    pd = _pandas()
    name = path.name.lower()
    if not path.is_file():
        raise DataFormatError(f"input file {path} does not exist")
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq  # type: ignore[import-untyped]

            for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
                yield batch.to_pandas()
        elif name.endswith((".csv", ".csv.gz", ".tsv")):
            sep = "\t" if name.endswith(".tsv") else ","
            with pd.read_csv(path, chunksize=rows, sep=sep, skipinitialspace=True) as reader:
                yield from reader
        else:
            raise DataFormatError(f"{path}: unknown format; use .csv, .csv.gz, .tsv or .parquet")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataFormatError(f"cannot read {path}: {exc}") from exc


def _features(
    frame: pd.DataFrame, schema: DataSchema | None, columns: Sequence[str] | None, encoder: Any
) -> np.ndarray:
    if encoder is not None:
        missing = [c for c in encoder.schema.features if c not in frame.columns]
        if missing:
            raise InvalidInputError(f"the input has no column {missing[0]!r} that the schema names")
        return np.asarray(encoder.encode(frame))
    selected = frame[list(columns)] if columns else frame
    try:
        return selected.to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"the input holds non-numeric values ({exc}); give the model's numeric input "
            "columns, or --schema to encode raw records"
        ) from exc


def predict_file(
    runtime: ModelRuntime,
    model: str,
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    schema: DataSchema | None = None,
    columns: Sequence[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict every row of ``source`` into ``output`` (CSV or Parquet by suffix).

    ``progress(rows_done)`` is called after each chunk. Returns rows and chunks.

    Raises:
        DataFormatError: the input cannot be read.
        InvalidInputError: a chunk does not fit the model (no output is written).

    """
    pd = _pandas()
    source, output = Path(source), Path(output)
    loaded = runtime.get(model)
    encoder = None
    if schema is not None:
        from insitu.data import FeatureEncoder

        encoder = FeatureEncoder.for_schema(schema)
    parquet = output.name.lower().endswith((".parquet", ".pq"))
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    rows = chunks = 0
    writer: Any = None
    try:
        for frame in _chunks(source, chunk_rows):
            try:
                features = _features(frame, schema, columns, encoder)
                outputs = runtime.predict(model, features)
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"{source.name}, rows {rows + 1}-{rows + len(frame)}: {exc}"
                ) from exc
            table = pd.DataFrame(
                {
                    f"{name}_{j}" if value.ndim > 1 and value.shape[1] > 1 else name: (
                        value.reshape(len(value), -1)[:, j]
                    )
                    for name, value in outputs.items()
                    for j in range(value.reshape(len(value), -1).shape[1])
                }
            )
            if parquet:
                import pyarrow as pa
                import pyarrow.parquet as pq

                arrow = pa.Table.from_pandas(table, preserve_index=False)
                writer = writer or pq.ParquetWriter(tmp, arrow.schema)
                writer.write_table(arrow)
            else:
                table.to_csv(tmp, mode="a", header=chunks == 0, index=False)
            rows += len(table)
            chunks += 1
            if progress is not None:
                progress(rows)
        if writer is not None:
            writer.close()
            writer = None
        if chunks == 0:
            raise DataFormatError(f"{source} holds no rows")
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(output)
        fsync_dir(output.parent)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return {"model": model, "version": loaded.version, "rows": rows, "chunks": chunks}
