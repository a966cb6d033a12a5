"""Records in, answers out: a model's data schema, from its signed card, at the edge.

A model is trained on *encoded* rows (:class:`insitu.data.FeatureEncoder`: scaled numbers,
one-hot categories), and its card carries the data schema it was trained with (in
``drift_reference["schema"]``, signed with the bundle). :class:`RecordSchema` uses that
schema so that an integrator sends records by column name, as the schema declares them,
and gets labels and probabilities back, without re-implementing the encoder:

* records are columns of values (:meth:`FeatureEncoder.columns_of`, types checked), then
  generalized as ``insitu data prepare`` generalized the training data (``band``,
  ``prefix``, ``month``, ``year``: the model never saw a raw age, only its band), then
  checked (:meth:`FeatureEncoder.check_columns`), then encoded. A missing value, a
  number outside its declared range, a category the schema does not declare, a value of
  the wrong type: each is refused with :class:`~insitu.errors.InvalidInputError` naming
  the column and the row. The encoder would clip or zero such a value and the model
  would answer about some other record; the schema declares no policy that allows it.
* encoded rows sent to a model whose card carries a schema are checked too
  (:meth:`RecordSchema.check_encoded`): a scaled or one-hot column outside [0, 1] is a
  raw value sent as an encoded one (a raw clinical row answered with a logit of 1658),
  refused with the column's name.
* :meth:`RecordSchema.answers` reads the first output: one logit with a positive class
  (``dataset.positive``) is binary (sigmoid), several logits are classes (softmax), one
  output without a positive class is a value (regression). The schema names only the
  positive class of a binary label (the other is ``not <positive>``) and no class of a
  multi-class one (the classes are then the output indices, ``"0"``, ``"1"``, ...).

Nothing here imports pandas: a device install has none.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from insitu.data import DataSchema, FeatureEncoder
from insitu.errors import DataFormatError, InvalidInputError, SchemaError

if TYPE_CHECKING:
    from insitu.bundle import ModelCard
    from insitu.runtime._runtime import LoadedModel

__all__ = ["Answers", "RecordSchema"]

logger = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "regression"]
RowName = Callable[[int], str]

# Encoded values are in [0, 1] wherever the schema scales; float32 rounding stays inside.
_SLACK = 1e-6
# Cached schemas of loaded models, by bundle id (a few models per node at most).
_CACHE_SIZE = 32
_GENERALIZED = {"year": re.compile(r"\d{4}"), "month": re.compile(r"\d{4}-\d{2}")}


def _row(index: int) -> str:
    return f"row {index + 1}"


@dataclass(frozen=True)
class RecordSchema:
    """A data schema as a served model uses it: records in, answers out."""

    schema: DataSchema
    encoder: FeatureEncoder = field(repr=False)

    @classmethod
    def of(cls, schema: DataSchema) -> RecordSchema:
        """The record schema of ``schema``.

        Raises:
            InvalidInputError: a categorical feature without declared categories (the
                columns of the encoding would depend on data the server does not have).

        """
        try:
            return cls(schema, FeatureEncoder.for_schema(schema))
        except ValueError as exc:
            raise InvalidInputError(
                f"the data schema cannot encode records ({exc}); declare the categories "
                "and publish the model again"
            ) from exc

    @classmethod
    def from_card(cls, card: ModelCard) -> RecordSchema | None:
        """The schema ``card`` carries, or ``None`` when it carries none.

        Raises:
            InvalidInputError: the card's schema is not a valid schema.

        """
        reference = card.drift_reference or {}
        doc = reference.get("schema") if isinstance(reference, Mapping) else None
        if not doc or "arrays" in doc:  # none, or an image or signal model's array schema
            return None
        try:
            return cls.of(DataSchema.from_dict(dict(doc)))
        except SchemaError as exc:
            raise InvalidInputError(
                f"the model card of {card.name} {card.version} carries an invalid data schema "
                f"({exc}); publish the model again with a valid one"
            ) from exc

    @classmethod
    def for_model(cls, model: LoadedModel) -> RecordSchema | None:
        """:meth:`from_card` of a loaded model, cached by bundle (``None``: no usable one)."""
        found = _cache.get(model.bundle_id)
        if found is _UNSET:
            try:
                found = cls.from_card(model.card)
            except InvalidInputError as exc:
                logger.warning("%s %s: %s", model.name, model.version, exc)
                found = exc
            _cache.put(model.bundle_id, found)
        return found if isinstance(found, RecordSchema) else None

    @classmethod
    def require(cls, model: LoadedModel) -> RecordSchema:
        """:meth:`for_model`, or the reason why records cannot be encoded for ``model``.

        Raises:
            InvalidInputError: the card carries no (usable) data schema.

        """
        schema = cls.for_model(model)
        if schema is not None:
            return schema
        found = _cache.get(model.bundle_id)
        if isinstance(found, InvalidInputError):
            raise found
        raise InvalidInputError(
            f"the model card of {model.name} {model.version} carries no data schema, so "
            'records cannot be encoded here; send encoded rows {"inputs": [[...], ...]}, or '
            "publish the model with its schema (a drift reference made from it)"
        )

    # -- records in ----------------------------------------------------------------------

    @property
    def features(self) -> tuple[str, ...]:
        """The columns a record must have."""
        return self.schema.features

    def key_column(self, columns: Iterable[str]) -> str | None:
        """The identifier among ``columns`` that keys a row: the subject, or a pseudonym."""
        present = set(columns)
        candidates = [self.schema.subject, *self.schema.pseudonymize]
        return next((c for c in candidates if c is not None and c in present), None)

    @functools.cached_property
    def input_columns(self) -> tuple[str, ...]:
        """The record column behind each model input, in the encoder's order.

        A numeric feature is one input; a binned one is one input per bin after its
        scaled value; a categorical one is one indicator per declared category.
        """
        owners = list(self.schema.numeric)
        for column in self.schema.numeric:
            if column in self.schema.bins:
                owners += [column] * (len(self.schema.bins[column]) + 1)
        for column in self.schema.categorical:
            owners += [column] * len(self.encoder.categories[column])
        return tuple(owners)

    def by_column(self, attributions: np.ndarray) -> dict[str, list[float]]:
        """Attributions per model input (rows x inputs) summed per record column.

        Additive attributions (SHAP's) of a column's inputs add up to the column's share
        of the output: what a person reading a record by column name asks for.

        Raises:
            InvalidInputError: ``attributions`` has another width than the encoding.

        """
        values = np.asarray(attributions, dtype=np.float64)
        owners = self.input_columns
        if values.ndim != 2 or values.shape[1] != len(owners):
            raise InvalidInputError(
                f"{values.shape[-1]} attributions per row for {len(owners)} encoded inputs; "
                "the model and its card's schema disagree (publish the model again)"
            )
        summed: dict[str, np.ndarray] = {}
        for j, column in enumerate(owners):
            summed[column] = summed.get(column, 0.0) + values[:, j]
        return {column: [float(v) for v in summed[column]] for column in self.features}

    def encode(
        self, records: Sequence[Mapping[str, Any]], *, row_name: RowName = _row
    ) -> np.ndarray:
        """Model inputs of ``records`` (one mapping per row), all checked first.

        Raises:
            InvalidInputError: the first value that cannot be taken, naming column and row.

        """
        try:
            columns = self.encoder.columns_of(records, row_name=row_name)
        except DataFormatError as exc:
            raise InvalidInputError(str(exc)) from None
        return self.encode_columns(columns, row_name=row_name)

    def encode_columns(self, columns: Mapping[str, Any], *, row_name: RowName = _row) -> np.ndarray:
        """Model inputs of feature columns (name -> values): generalized, checked, encoded.

        Raises:
            InvalidInputError: the first value that cannot be taken, naming column and row.

        """
        try:
            generalized = self._generalize(columns, row_name)
            self.encoder.check_columns(generalized, row_name=row_name)
            return self.encoder.encode_columns(generalized)
        except DataFormatError as exc:
            raise InvalidInputError(str(exc)) from None

    def _generalize(self, columns: Mapping[str, Any], row_name: RowName) -> dict[str, Any]:
        """``columns`` with each generalized feature as ``insitu data prepare`` left it."""
        out = dict(columns)
        for column, rule in self.schema.generalize.items():
            if column not in self.schema.features or column not in out:
                continue
            values = np.asarray(out[column])
            if rule.kind == "band":
                try:
                    numbers = np.asarray(values, dtype=np.float64)
                except (TypeError, ValueError):
                    continue  # not numbers: check_columns names the value
                out[column] = np.floor(numbers / rule.size) * rule.size
                continue
            texts = [
                None if v is None else _generalize_text(rule.kind, rule.size, str(v))
                for v in values
            ]
            for i, (value, text) in enumerate(zip(values, texts, strict=True)):
                if value is not None and text is None:
                    raise DataFormatError(
                        f"{row_name(i)}: column {column!r} = {str(value)[:40]!r} is not a "
                        "date; send YYYY-MM-DD"
                    )
            array = np.empty(len(texts), dtype=object)
            array[:] = texts
            out[column] = array
        return out

    def check_encoded(self, rows: np.ndarray, *, row_name: RowName = _row) -> None:
        """Refuse encoded rows with a scaled or one-hot column outside [0, 1].

        Such a value was never produced by the encoder: it is a raw value (an age of 54,
        an area of 648.2) sent where the model takes its encoding.

        Raises:
            InvalidInputError: naming the row, the input column and its feature.

        """
        names = self._names
        if rows.ndim != 2 or rows.shape[1] != len(names):
            return  # not this schema's encoding; the card's input shape is checked already
        bounded = self._bounded
        values = np.asarray(rows[:, bounded], dtype=np.float64)
        outside = (values < -_SLACK) | (values > 1 + _SLACK)
        if not outside.any():
            return
        row, position = (int(i) for i in np.argwhere(outside)[0])
        column = int(np.flatnonzero(bounded)[position])
        raise InvalidInputError(
            f"{row_name(row)}: input column {column} ({names[column]!r}) = "
            f"{values[row, position]:g} is outside [0, 1], where the schema encodes it: this "
            'looks like a raw value; send {"records": [{"column": value, ...}]} and the '
            "server encodes them as in training"
        )

    @functools.cached_property
    def _names(self) -> list[str]:
        return self.encoder.names

    @functools.cached_property
    def _bounded(self) -> np.ndarray:
        # Encoded columns the encoder keeps in [0, 1]: ranged numbers, bins, categories.
        mask = np.ones(len(self._names), dtype=bool)
        for i, column in enumerate(self.schema.numeric):
            mask[i] = column in self.schema.ranges
        return mask

    # -- answers out ---------------------------------------------------------------------

    def answers(self, output: np.ndarray) -> Answers:
        """What the model's first ``output`` (rows x logits) means in the schema's terms."""
        logits = np.asarray(output, dtype=np.float64).reshape(len(output), -1)
        positive = self.schema.positive
        if logits.shape[1] == 1 and positive is None:
            return Answers("regression", (), values=logits[:, 0])
        if logits.shape[1] == 1:
            p = _sigmoid(logits[:, 0])
            return Answers("binary", (f"not {positive}", str(positive)), np.stack([1 - p, p], 1))
        if logits.shape[1] == 2 and positive is not None:
            return Answers("binary", (f"not {positive}", positive), _softmax(logits))
        classes = tuple(str(i) for i in range(logits.shape[1]))
        return Answers("multiclass", classes, _softmax(logits))


@dataclass(frozen=True)
class Answers:
    """A batch of model outputs read as classes and probabilities, or as values.

    ``probabilities`` is rows x ``classes`` (each row sums to 1); for a binary model the
    classes are ``("not <positive>", "<positive>")``, so column 1 is the probability of
    the positive class (the sigmoid of the logit). ``values`` are a regressor's outputs.
    """

    task: Task
    classes: tuple[str, ...]
    probabilities: np.ndarray | None = None
    values: np.ndarray | None = None

    @property
    def labels(self) -> list[str]:
        """The most probable class of each row (empty for a regressor)."""
        if self.probabilities is None:
            return []
        return [self.classes[i] for i in self.probabilities.argmax(axis=1)]

    def to_json(self) -> list[dict[str, Any]]:
        """One object per row: label and probabilities, or a regressor's value.

        ``label``, ``probability`` (of that label) and ``probabilities`` (by class, in
        the order of :attr:`classes`); or ``value``.
        """
        if self.probabilities is None:
            values = self.values if self.values is not None else np.zeros(0)
            return [{"value": float(v)} for v in values]
        chosen = self.probabilities.argmax(axis=1)
        return [
            {
                "label": self.classes[c],
                "probability": float(row[c]),
                "probabilities": [float(p) for p in row],
            }
            for c, row in zip(chosen, self.probabilities, strict=True)
        ]

    def columns(self) -> dict[str, Any]:
        """Output columns for a file: label and probability, or a regressor's value.

        ``label`` and ``probability`` (of the label), and for a binary model
        ``probability_<positive>``; or ``value``.
        """
        if self.probabilities is None:
            return {"value": self.values}
        chosen = self.probabilities.argmax(axis=1)
        columns: dict[str, Any] = {
            "label": np.asarray(self.classes, dtype=object)[chosen],
            "probability": self.probabilities[np.arange(len(chosen)), chosen],
        }
        if self.task == "binary":
            columns[f"probability_{self.classes[1]}"] = self.probabilities[:, 1]
        return columns

    def summary(self) -> dict[str, Any]:
        """What the response says once for the batch: the task and its classes."""
        return {"task": self.task, "classes": list(self.classes)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Stable for large |x|: exp of a negative number only.
    e = np.exp(-np.abs(x))
    result: np.ndarray = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
    return result


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    result: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return result


def _generalize_text(kind: str, size: int, text: str) -> str | None:
    """``text`` under a ``prefix``, ``month`` or ``year`` rule; ``None``: not a date."""
    if kind == "prefix":
        return text[:size]
    if _GENERALIZED[kind].fullmatch(text):
        return text  # already generalized (a prepared file)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.strftime("%Y-%m" if kind == "month" else "%Y")


_UNSET = object()
_Cached = RecordSchema | InvalidInputError | None


class _Cache:
    """Schemas by bundle id: a loaded model's schema is parsed once, not per request."""

    def __init__(self) -> None:
        self._items: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> _Cached | object:
        return self._items.get(key, _UNSET)

    def put(self, key: str, value: _Cached) -> None:
        with self._lock:
            if len(self._items) >= _CACHE_SIZE:
                self._items.pop(next(iter(self._items)))
            self._items[key] = value


_cache = _Cache()
