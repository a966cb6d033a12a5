"""Image models at the edge: uploaded PNG/JPEG files in, occlusion heat maps out.

A model whose card declares one input of shape (batch, C, H, W) with C, H and W fixed
takes images. :class:`ImageInput` reads what the signed card declares about them: the
shape from its input, and the value range and class names from the array schema it
carries (``drift_reference["schema"]``: an array schema, or the table schema an array
schema becomes, whose every value column has the same declared range). An uploaded file
becomes one record of exactly that shape and range (:meth:`ImageInput.decode`): grey
(``L``) or RGB as C says, pixel 0 to 255 (0 to 65535 for 16-bit grey) mapped linearly
onto the declared range. A file of another size is refused naming both sizes, unless the
caller asks for a resize (stretched to W x H: the aspect is not kept).

Decoding is hostile-input work, so it is bounded: Pillow may open PNG and JPEG only (its
other decoders are never reached), the pixel count is checked from the header before a
pixel is decoded (:data:`MAX_IMAGE_PIXELS`; a few hundred kilobytes of PNG can claim
gigabytes), and every decoder failure (not an image, truncated, corrupt) is an
:class:`~insitu.errors.UnreadableImageError` in one line. Pillow is imported only here
and only when an image arrives: a device install (no Pillow) serves NPY bodies and
answers an upload with :class:`~insitu.errors.MissingDependencyError`.

:func:`explain_image` runs :func:`~insitu.runtime.occlusion_map` over the loaded ONNX
session (:meth:`LoadedModel.run`: the occluded copies are neither counted as
predictions nor shown to observers). :meth:`ImageExplanation.png` draws the heat map with
NumPy and Pillow only (matplotlib is not on a device): the image in grey, enlarged with
whole pixels, red where hiding a region lowers the explained class's score and blue
where it raises it, opacity by magnitude, and a colour scale with its bounds.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from insitu._atomic import atomic_write_bytes
from insitu.errors import (
    InvalidInputError,
    MissingDependencyError,
    SchemaError,
    UnreadableImageError,
)
from insitu.runtime._occlusion import occlusion_map

if TYPE_CHECKING:
    from insitu.bundle import ModelCard
    from insitu.runtime._runtime import LoadedModel

__all__ = [
    "MAX_IMAGE_PIXELS",
    "ImageExplanation",
    "ImageInput",
    "explain_image",
    "heat_map_png",
]

logger = logging.getLogger(__name__)

#: The most pixels an uploaded image may have (4096 x 4096): larger ones are refused
#: from their header, before decoding (a decompression bomb claims far more).
MAX_IMAGE_PIXELS = 4096 * 4096
#: The decoders Pillow may use for an upload.
IMAGE_FORMATS = ("PNG", "JPEG")
#: Occluded copies of one record at most held in memory at once (bytes).
_MAX_OCCLUSION_BYTES = 64 << 20
#: Rows per ``session.run`` while occluding.
_OCCLUSION_CHUNK = 256
#: The heat map's longest side is enlarged to at least this many pixels.
_HEAT_MAP_SIDE = 256
_POSITIVE = np.array([220.0, 40.0, 30.0])
_NEGATIVE = np.array([30.0, 90.0, 230.0])


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # a device install: NPY bodies only
        raise MissingDependencyError(
            "images need Pillow, which this install lacks: pip install pillow (the 'serve' "
            "extra brings it), or send the values as an NPY array (N, C, H, W)"
        ) from exc
    return Image


@dataclass(frozen=True)
class ImageInput:
    """What a model's signed card declares about the images it takes."""

    model: str
    name: str
    channels: int
    height: int
    width: int
    value_range: tuple[float, float] | None
    class_names: tuple[str, ...] | None

    @classmethod
    def from_card(cls, card: ModelCard) -> ImageInput | None:
        """The image input of ``card``; ``None`` when the model does not take images."""
        if len(card.inputs) != 1:
            return None
        shape = list(card.inputs[0].get("shape") or [])
        dims = shape[1:]
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in dims):
            return None
        value_range, names = _declared(card, tuple(dims))
        return cls(
            model=card.name,
            name=str(card.inputs[0].get("name")),
            channels=dims[0],
            height=dims[1],
            width=dims[2],
            value_range=value_range,
            class_names=names,
        )

    @classmethod
    def for_model(cls, model: LoadedModel) -> _Described:
        """:meth:`from_card` of a loaded model, cached by bundle (a few per node at most)."""
        found = _described.get(model.bundle_id)
        if found is None:
            found = _Described(cls.from_card(model.card))
            if len(_described) >= _CACHED:
                _described.pop(next(iter(_described)))
            _described[model.bundle_id] = found
        return found

    def answers(self, logits: np.ndarray) -> dict[str, Any]:
        """``classes`` and, per row, ``label``, ``probability`` and ``probabilities``.

        The softmax of the declared classes' scores; empty when the card names no classes
        or the output is not one score per class.
        """
        names = self.class_names
        scores = np.asarray(logits, dtype=np.float64)
        if not names or scores.ndim != 2 or scores.shape[1] != len(names):
            return {}
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        predictions = [
            {
                "label": names[int(row.argmax())],
                "probability": float(row.max()),
                "probabilities": row.tolist(),
            }
            for row in probabilities
        ]
        return {"classes": list(names), "predictions": predictions}

    def require_range(self) -> tuple[float, float]:
        """The declared value range, or why an image cannot be turned into values.

        Raises:
            InvalidInputError: the card carries no array schema with a value range.

        """
        if self.value_range is None:
            raise InvalidInputError(
                f"the model card of {self.model} declares no value range for its images, so "
                "an image file cannot be scaled to the values it was trained on; send the "
                "values as NPY (N, C, H, W), or publish the model with its array schema"
            )
        return self.value_range

    def decode(
        self, data: bytes, *, resize: bool = False, max_pixels: int = MAX_IMAGE_PIXELS
    ) -> np.ndarray:
        """One record (1, C, H, W), float32 in the declared range, from PNG or JPEG ``data``.

        Raises:
            InvalidInputError: the model takes no grey or RGB images, its card declares no
                value range, or the image has another size and ``resize`` is false.
            UnreadableImageError: not a PNG or JPEG image, truncated or corrupt, or over
                ``max_pixels`` pixels (``too_large``).
            MissingDependencyError: Pillow is not installed.

        """
        if self.channels not in (1, 3):
            raise InvalidInputError(
                f"model {self.model!r} takes {self.channels} channels per image, neither grey "
                "(1) nor RGB (3); send the values as NPY (N, C, H, W)"
            )
        low, high = self.require_range()
        image_module = _pillow()
        bomb = (image_module.DecompressionBombError, image_module.DecompressionBombWarning)
        try:
            with image_module.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                unit = self._unit_values(image_module, image, resize, max_pixels)
        except bomb:
            raise UnreadableImageError(
                f"the image claims more than {max_pixels} pixels (a decompression bomb?); "
                f"send at most {max_pixels} pixels",
                too_large=True,
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            raise UnreadableImageError(
                f"the upload is not a readable PNG or JPEG image ({str(exc)[:160]}); send a "
                "PNG or JPEG file"
            ) from None
        values: np.ndarray = (low + np.clip(unit, 0.0, 1.0) * (high - low)).astype(np.float32)
        return values[None]

    def _unit_values(self, pil: Any, image: Any, resize: bool, max_pixels: int) -> np.ndarray:
        """(C, H, W) values in [0, 1] of an opened image (nothing decoded before the checks)."""
        width, height = image.size
        if width * height > max_pixels:
            raise UnreadableImageError(
                f"the image is {width}x{height} = {width * height} pixels, over the limit "
                f"of {max_pixels}; send a smaller image",
                too_large=True,
            )
        target = (self.width, self.height)
        if (width, height) != target and not resize:
            raise InvalidInputError(
                f"the image is {width}x{height} pixels (width x height); model {self.model!r} "
                f"takes {self.width}x{self.height}: send an image of that size, or add "
                "?resize=true to resize it (stretched: the aspect is not kept)"
            )
        deep = self.channels == 1 and image.mode.startswith("I")  # 16-bit grey
        if deep:
            unit = np.asarray(image.convert("I"), dtype=np.float32) / 65535.0
            if (width, height) != target:
                plane = pil.fromarray(unit)
                unit = np.asarray(plane.resize(target, pil.Resampling.LANCZOS))
            return unit[None]
        converted = image.convert("L" if self.channels == 1 else "RGB")
        if (width, height) != target:
            converted = converted.resize(target, pil.Resampling.LANCZOS, reducing_gap=3.0)
        pixels = np.asarray(converted, dtype=np.float32) / 255.0
        return pixels[None] if self.channels == 1 else pixels.transpose(2, 0, 1)


@dataclass(frozen=True)
class _Described:
    """A cached :meth:`ImageInput.from_card` (``image`` is ``None``: no image input)."""

    image: ImageInput | None

    def answers(self, logits: np.ndarray) -> dict[str, Any]:
        return self.image.answers(logits) if self.image is not None else {}


_CACHED = 16
_described: dict[str, _Described] = {}


def _declared(
    card: ModelCard, shape: tuple[int, ...]
) -> tuple[tuple[float, float] | None, tuple[str, ...] | None]:
    """The value range and class names of the schema ``card`` carries (``None`` if none)."""
    reference = card.drift_reference or {}
    doc = reference.get("schema") if isinstance(reference, Mapping) else None
    if not isinstance(doc, Mapping):
        return None, None
    if "arrays" in doc:  # an array schema, as written
        return _array_schema(card.name, doc, shape)
    return _table_range(doc, shape), None


def _array_schema(
    model: str, doc: Mapping[str, Any], shape: tuple[int, ...]
) -> tuple[tuple[float, float] | None, tuple[str, ...] | None]:
    from insitu.data import ArraySchema

    try:
        arrays = ArraySchema.from_dict(dict(doc))
    except SchemaError as exc:
        logger.warning("%s: the card's array schema is invalid (%s)", model, exc)
        return None, None
    if arrays.shape != shape:
        logger.warning(
            "%s: the card's schema declares records of %s, its input is %s",
            model,
            arrays.shape,
            shape,
        )
        return None, None
    return arrays.value_range, arrays.label_names


def _table_range(doc: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[float, float] | None:
    """The range of the table an array schema becomes: one column per value, one range."""
    features = doc.get("features")
    if not isinstance(features, Mapping):
        return None
    numeric = features.get("numeric") or []
    ranges = features.get("ranges") or {}
    found = {tuple(ranges.get(column) or ()) for column in numeric}
    if len(numeric) != math.prod(shape) or len(found) != 1:
        return None
    (bounds,) = found
    if len(bounds) != 2 or not all(isinstance(v, int | float) for v in bounds):
        return None
    low, high = float(bounds[0]), float(bounds[1])
    return (low, high) if low < high else None


@dataclass(frozen=True)
class ImageExplanation:
    """The occlusion heat map of one record for one class (see the module docstring)."""

    record: np.ndarray
    heat: np.ndarray
    target: int
    label: str | None
    score: float
    patch: int
    baseline: float
    value_range: tuple[float, float] | None

    def to_json(self) -> dict[str, Any]:
        """As ``/explain`` returns it (``attributions``: one value per pixel, H x W)."""
        return {
            "method": "occlusion",
            "class": self.target,
            "label": self.label,
            "score": self.score,
            "patch": self.patch,
            "baseline": self.baseline,
            "attributions": self.heat.tolist(),
        }

    def png(self) -> bytes:
        """The heat map as PNG bytes (:func:`heat_map_png`)."""
        return heat_map_png(self.record, self.heat, value_range=self.value_range)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`png` to ``path`` (whole or not at all); return the path."""
        target = Path(path)
        atomic_write_bytes(target, self.png())
        return target


def explain_image(
    model: LoadedModel,
    record: Any,
    *,
    patch: int | None = None,
    target: int | None = None,
) -> ImageExplanation:
    """Occlusion attributions of ``record`` (C, H, W) or (C, L) for ``model``.

    ``patch``: the side of the square hidden at a time (default: the longest side / 16,
    at least 2); the map has one value per pixel, equal within a patch. The hidden
    values take the low end of the declared value range (0 without one).

    Raises:
        InvalidInputError: the record does not fit the card, or the patch is out of range
            or so small that the occluded copies would not fit in memory.

    """
    spec = model.input
    if len(model.inputs) != 1 or len(spec.shape) not in (3, 4):
        raise InvalidInputError(
            f"model {model.name!r} does not take images or signals (one input of (batch, "
            "C, H, W) or (batch, C, L)); explain it with SHAP"
        )
    checked = model.check(np.asarray(record)[None], max_rows=1, cast=True)[spec.name][0]
    spatial = checked.shape[1:]
    side = max(spatial)
    patch = patch if patch is not None else min(side, max(2, -(-side // 16)))
    if not 1 <= patch <= side:
        raise InvalidInputError(f"patch {patch} is outside [1, {side}]; choose one in range")
    copies = math.prod(-(-n // patch) for n in spatial) + 1
    if copies * checked.nbytes > _MAX_OCCLUSION_BYTES:
        raise InvalidInputError(
            f"a patch of {patch} makes {copies} occluded copies of the record, over "
            f"{_MAX_OCCLUSION_BYTES >> 20} MiB; choose a larger patch"
        )
    described = ImageInput.from_card(model.card)
    value_range = described.value_range if described is not None else None
    baseline = value_range[0] if value_range is not None else 0.0

    def predict(batch: np.ndarray) -> np.ndarray:
        chunks = [
            model.run({spec.name: np.ascontiguousarray(batch[i : i + _OCCLUSION_CHUNK])})[0]
            for i in range(0, len(batch), _OCCLUSION_CHUNK)
        ]
        return np.concatenate([np.asarray(c).reshape(len(c), -1) for c in chunks])

    heat, explained = occlusion_map(
        predict, checked.astype(spec.dtype), patch=patch, baseline=baseline, target=target
    )
    scores = predict(checked[None].astype(spec.dtype))[0]
    names = described.class_names if described is not None else None
    label = names[explained] if names is not None and explained < len(names) else None
    return ImageExplanation(
        record=checked,
        heat=heat,
        target=explained,
        label=label,
        score=float(scores[explained if len(scores) > 1 else 0]),
        patch=patch,
        baseline=baseline,
        value_range=value_range,
    )


def heat_map_png(
    record: np.ndarray,
    heat: np.ndarray,
    *,
    value_range: tuple[float, float] | None = None,
) -> bytes:
    """A PNG of ``record`` (C, H, W) in grey with ``heat`` (H, W) overlaid, and its scale.

    The image is enlarged by a whole factor (its longest side to at least 256 pixels),
    so the picture's left part, its height by ``width * factor``, has the record's aspect;
    the colour scale, 64 pixels wide, is on its right.

    Raises:
        InvalidInputError: ``record`` is not (C, H, W) or ``heat`` not (H, W).
        MissingDependencyError: Pillow is not installed.

    """
    record = np.asarray(record, dtype=np.float64)
    heat = np.asarray(heat, dtype=np.float64)
    if record.ndim != 3 or heat.shape != record.shape[1:]:
        raise InvalidInputError(
            f"a heat map needs a record (C, H, W) and a map (H, W), not {record.shape} and "
            f"{heat.shape}"
        )
    pil = _pillow()
    from PIL import ImageDraw

    low, high = value_range or (float(record.min()), float(record.max()))
    grey = np.clip((record.mean(axis=0) - low) / ((high - low) or 1.0), 0.0, 1.0)
    factor = max(1, -(-_HEAT_MAP_SIDE // max(grey.shape)))
    largest = float(np.abs(heat).max()) or 1.0
    picture = _blend(
        np.kron(grey * 255.0, np.ones((factor, factor))),
        np.kron(heat, np.ones((factor, factor))) / largest,
    )
    height, width = picture.shape[:2]
    canvas = np.full((height, width + 64, 3), 255.0)
    canvas[:, :width] = picture
    ramp = np.linspace(1.0, -1.0, max(height - 24, 2))[:, None] * np.ones((1, 14))
    canvas[12 : 12 + len(ramp), width + 6 : width + 20] = _blend(np.full(ramp.shape, 128.0), ramp)
    image = pil.fromarray(np.round(canvas).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for text, y in (
        (f"{largest:+.2g}", 6),
        ("0", height // 2 - 6),
        (f"{-largest:+.2g}", height - 18),
    ):
        draw.text((width + 22, y), text, fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _blend(grey: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """Grey (0-255) under red (signed > 0) or blue (< 0), opacity 0.8 x |signed|."""
    alpha = 0.8 * np.clip(np.abs(signed), 0.0, 1.0)[..., None]
    colour = np.where((signed >= 0)[..., None], _POSITIVE, _NEGATIVE)
    blended: np.ndarray = grey[..., None] * (1.0 - alpha) + colour * alpha
    return blended
