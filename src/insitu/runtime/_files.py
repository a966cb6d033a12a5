"""Batch prediction over files (``insitu predict``): streamed, so any size fits in memory.

The input is read in chunks (``pandas.read_csv(chunksize=...)``, or
``pyarrow.parquet.ParquetFile.iter_batches``), each chunk is checked against the model
card, run, and its predictions appended to a temporary file beside the output; the
temporary file is renamed over the output only when every chunk succeeded (fsync first),
so a failure leaves no half-written output. Memory use is one chunk, whatever the size
of the file.

Columns: records are encoded by the data schema (:class:`~insitu.runtime.RecordSchema`:
generalized, checked and encoded as in training; a value the schema does not allow stops
the run, naming its row and column), the schema given (``schema``, which must be the one
the model's card carries, if it carries one) or else the card's, when the file has its
feature columns. Otherwise (or with ``columns``) the file holds the model's input columns
as numbers, in order (all columns, or those named in ``columns``).

The output keeps a row key to join back on: the identifier column the schema declares
(the subject, or a pseudonymized column) when the file has it, else ``row`` (1, 2, ...);
then the model's raw outputs; then, when a schema says what they mean, ``label`` and
``probability`` (of that label; a binary model also ``probability_<positive>``), or
``value`` for a regressor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from insitu._atomic import atomic_writer
from insitu.errors import DataFormatError, InvalidInputError, MissingDependencyError, SchemaError
from insitu.runtime._records import RecordSchema

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


class _Predictor:
    """Predictions of consecutive chunks of one file, as output columns.

    The first chunk decides how the file is read (:meth:`_plan`) and its row key.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        model: str,
        *,
        schema: DataSchema | None,
        columns: Sequence[str] | None,
        source: str,
    ) -> None:
        self.runtime = runtime
        self.model = model
        self.loaded = runtime.get(model)
        self.schema = schema
        self.columns = columns
        self.source = source
        self.rows = 0
        self.described: RecordSchema | None = None
        self.records = False
        self.key: str | None = None

    def _plan(self, frame: pd.DataFrame) -> None:
        """The record schema of this prediction, whether the file holds records, its key."""
        carried = RecordSchema.for_model(self.loaded)
        schema = self.schema
        if schema is None:
            self.described = carried
            self.records = (
                not self.columns
                and carried is not None
                and any(c in frame.columns for c in carried.features)
            )
        else:
            if carried is not None and carried.schema.digest() != schema.digest():
                raise SchemaError(
                    f"the schema {schema.name!r} given is not the one {self.loaded.name} "
                    f"{self.loaded.version} was trained with (its card carries "
                    f"{carried.schema.name!r}, sha256 {carried.schema.digest()[:12]}...); "
                    "leave out --schema to use the card's"
                )
            self.described, self.records = RecordSchema.of(schema), not self.columns
        if self.described is not None:
            self.key = self.described.key_column(frame.columns)

    def _row_name(self, index: int) -> str:
        return f"row {self.rows + index + 1}"

    def _features(self, frame: pd.DataFrame) -> np.ndarray:
        described = self.described
        if described is not None and self.records:
            missing = [c for c in described.features if c not in frame.columns]
            if missing:
                raise InvalidInputError(
                    f"the input has no column {missing[0]!r} that the schema names"
                )
            arrays = {c: frame[c].to_numpy() for c in described.features}
            return described.encode_columns(arrays, row_name=self._row_name)
        selected = frame[list(self.columns)] if self.columns else frame
        try:
            features = selected.to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"the input holds non-numeric values ({exc}); give the model's numeric input "
                "columns, or --schema to encode raw records"
            ) from exc
        if described is not None:
            described.check_encoded(features, row_name=self._row_name)
        return features

    def predict(self, frame: pd.DataFrame) -> dict[str, Any]:
        """Output columns of ``frame``: row key, raw outputs, then label and probability."""
        if self.rows == 0:
            self._plan(frame)
        count = len(frame)
        try:
            outputs = self.runtime.predict(self.model, self._features(frame))
        except InvalidInputError as exc:
            rows = f"rows {self.rows + 1}-{self.rows + count}: "
            where = "" if str(exc).startswith("row ") else rows
            raise InvalidInputError(f"{self.source}, {where}{exc}") from exc
        key = self.key
        first = self.rows + 1
        table: dict[str, Any] = {
            key or "row": frame[key].to_numpy() if key else np.arange(first, first + count)
        }
        for name, value in outputs.items():
            flat = value.reshape(count, -1)
            for j in range(flat.shape[1]):
                table[f"{name}_{j}" if flat.shape[1] > 1 else name] = flat[:, j]
        if self.described is not None and outputs:
            table |= self.described.answers(next(iter(outputs.values()))).columns()
        self.rows += count
        return table


def _append(
    table: pd.DataFrame, handle: BinaryIO, writer: Any, *, parquet: bool, first: bool
) -> Any:
    """Append ``table`` to the open ``handle``; returns the Parquet writer (``None`` for CSV)."""
    if not parquet:
        handle.write(table.to_csv(header=first, index=False).encode("utf-8"))
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    writer = writer or pq.ParquetWriter(handle, arrow.schema)
    writer.write_table(arrow)
    return writer


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

    ``progress(rows_done)`` is called after each chunk. Returns rows and chunks, the row
    key column, and whether labels were written (``labelled``: a schema was known).

    Raises:
        DataFormatError: the input cannot be read.
        InvalidInputError: a chunk does not fit the model (no output is written).
        SchemaError: ``schema`` is not the schema the model's card carries.

    """
    pd = _pandas()
    source, output = Path(source), Path(output)
    predictor = _Predictor(runtime, model, schema=schema, columns=columns, source=source.name)
    parquet = output.name.lower().endswith((".parquet", ".pq"))
    output.parent.mkdir(parents=True, exist_ok=True)
    chunks = 0
    writer: Any = None
    # An unpredictable temporary file beside the output, renamed over it only when every
    # chunk succeeded; an output path that is a symbolic link is refused.
    with atomic_writer(output) as handle:
        try:
            for frame in _chunks(source, chunk_rows):
                table = pd.DataFrame(predictor.predict(frame))
                writer = _append(table, handle, writer, parquet=parquet, first=chunks == 0)
                chunks += 1
                if progress is not None:
                    progress(predictor.rows)
            if chunks == 0:
                raise DataFormatError(f"{source} holds no rows")
        finally:
            if writer is not None:
                writer.close()
    return {
        "model": model,
        "version": predictor.loaded.version,
        "rows": predictor.rows,
        "chunks": chunks,
        "key": predictor.key or "row",
        "labelled": predictor.described is not None,
    }
