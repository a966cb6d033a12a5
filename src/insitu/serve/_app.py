"""The localhost API (FastAPI): models, predictions, explanations, health and metrics.

Endpoints (OpenAPI at ``/docs``, ``/redoc`` and ``/openapi.json``; the pages' assets
are served from this machine, :mod:`insitu.serve._docs`)::

    GET  /healthz                        liveness, no token (says only "ok")
    GET  /metrics                        Prometheus text format          (token)
    GET  /v1/models                      models served and their cards   (token)
    POST /v1/models/{name}/predict       JSON, NPY, raw body or an image (token)
    POST /v1/models/{name}/explain       SHAP attributions; image models:
                                         occlusion map, JSON or PNG      (token)

Every error is JSON ``{"detail": "<problem>; <fix>"}`` with a 4xx status: 400 for a
body that cannot be read, 401 for a missing or wrong token, 404 for an unknown model,
408 for a body that does not arrive in time, 413 for an oversize body (both close the
connection), 415 for an unknown content type, 422 for inputs that do not fit the model
card. A 5xx means a bug (or a model that fails on valid input).

The predict path is written for speed: the body is read and decoded by hand (no
Pydantic model for the rows: JSON and validation of thousands of floats would cost more
than the model), and the OpenAPI document describes it with ``openapi_extra``.

Image models (one input of (batch, C, H, W)) also take an image file, raw or as a form
upload (:mod:`insitu.serve._upload`), decoded by the card's declarations
(:class:`insitu.runtime.ImageInput`): an unreadable image is a 400, one over the pixel
limit a 413, one of another size a 422 unless ``?resize=true``. Their ``/explain`` is
an occlusion map over the ONNX session (``?format=png`` or ``Accept: image/png``: the
heat map as a PNG).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, params
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from insitu.errors import (
    InferenceError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    UnreadableImageError,
    UsageError,
)
from insitu.runtime import (
    MAX_EXPLAIN_ROWS,
    Explainer,
    ImageInput,
    LoadedModel,
    ModelRuntime,
    RecordSchema,
    explain_image,
)
from insitu.serve._batching import MicroBatcher
from insitu.serve._codec import (
    BODY_TIMEOUT,
    MAX_BODY_BYTES,
    BodyError,
    decode_inputs,
    encode_npy,
    read_body,
)
from insitu.serve._docs import add_offline_docs
from insitu.serve._metrics import ServeMetrics
from insitu.serve._upload import IMAGE_TYPES, image_of

__all__ = ["Background", "BackgroundSource", "create_app"]

logger = logging.getLogger(__name__)

#: A background sample for explanations, and its feature names (or ``None``).
Background = tuple[np.ndarray, list[str] | None]
BackgroundSource = Mapping[str, Background] | Callable[[str], Background | None]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The body cannot be read (malformed JSON, NPY or raw values)."},
    401: {"description": "Missing or wrong bearer token."},
    404: {"description": "No model of that name."},
    408: {"description": "The body did not arrive in time (the connection is closed)."},
    413: {"description": "The body is over the server's limit (the connection is closed)."},
    415: {"description": "Unsupported content type."},
    422: {"description": "Inputs that do not fit the model card (shape, dtype, NaN/inf)."},
    501: {"description": "This install lacks the package the request needs (SHAP, Pillow)."},
}
#: Records encoded on the event loop; more go to a thread (about 15 us per record).
_INLINE_RECORDS = 256
_INPUTS_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {
            "description": "Rows of numbers (a batch), or an object of such arrays by input name.",
            "oneOf": [{"type": "array", "items": {}}, {"type": "object"}],
        }
    },
}
_RECORDS_SCHEMA = {
    "type": "object",
    "required": ["records"],
    "properties": {
        "records": {
            "description": "Records by column name, with raw values as the model's data "
            "schema declares them (numbers for numeric features, text for categorical "
            "ones), encoded by the schema in the model's signed card. A missing column, a "
            "value outside its declared range, an unknown category or a value of the wrong "
            "type is refused (422), naming the column and the record. The answer adds "
            "'predictions' (label, probability, probabilities by class, or value) and "
            "'classes'.",
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": {"anyOf": [{"type": "number"}, {"type": "string"}]},
            },
        }
    },
}
#: ``/predict`` takes encoded rows (``inputs``) or records by column name (``records``).
_PREDICT_SCHEMA = {"oneOf": [_INPUTS_SCHEMA, _RECORDS_SCHEMA]}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
#: An image model's file: raw, or as the one field of a form.
_IMAGE_CONTENT: dict[str, Any] = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}},
        }
    },
    **dict.fromkeys(IMAGE_TYPES, _BINARY),
}
_RESIZE = {
    "name": "resize",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "Image uploads: resize an image of another size to the model's "
    "(stretched). Without it such an image is refused (422).",
}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _PREDICT_SCHEMA},
            "application/x-npy": _BINARY,
            "application/octet-stream": _BINARY,
            **_IMAGE_CONTENT,
        },
    },
    "parameters": [_RESIZE],
}
_EXPLAIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _PREDICT_SCHEMA},
            "application/x-npy": _BINARY,
            **_IMAGE_CONTENT,
        },
    }
}
_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Outputs by name (JSON), or the first output as NPY "
        "when the request sends 'Accept: application/x-npy'.",
        "content": {
            "application/json": {},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    **_ERRORS,
}


_EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Attributions as JSON; for an image model with '?format=png' or "
        "'Accept: image/png', the heat map as a PNG.",
        "content": {"application/json": {}, "image/png": _BINARY},
    },
    406: {"description": "A PNG asked of a model that does not take images."},
    **_ERRORS,
}


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _not_served(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"no model named {name!r}; GET /v1/models lists those served")


class _State:
    """What the endpoints share (``app.state.insitu``)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: ServeMetrics,
        backgrounds: BackgroundSource | None,
        *,
        max_batch_rows: int,
        max_wait: float,
        max_body_bytes: int,
        body_timeout: float,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.backgrounds = backgrounds
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.batchers = {
            name: MicroBatcher(
                runtime, name, metrics=metrics, max_batch_rows=max_batch_rows, max_wait=max_wait
            )
            for name in runtime.names
        }
        self._explainers: dict[tuple[str, str], Explainer] = {}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the runtime (egress guard, watcher) and load each model; stop it all after."""
        runtime = self.runtime
        runtime.start()
        for name in runtime.names:
            try:
                await run_in_threadpool(runtime.get, name)
            except InferenceError as exc:
                logger.warning("%s is not available yet: %s", name, exc)
        try:
            yield
        finally:
            for batcher in self.batchers.values():
                await batcher.stop()
            runtime.close()

    async def body(self, request: Request) -> bytes:
        """The body of ``request``: 413 over the size limit, 408 when it comes too slowly."""
        return await read_body(
            request.stream(),
            request.headers.get("content-length"),
            max_bytes=self.max_body_bytes,
            timeout=self.body_timeout,
        )

    def explainer(self, model: LoadedModel) -> Explainer:
        key = (model.name, model.bundle_id)
        if key not in self._explainers:
            source = self.backgrounds
            found = None
            if callable(source):
                found = source(model.name)
            elif source is not None:
                found = source.get(model.name)
            if found is None:
                raise InvalidInputError(
                    f"no background sample for {model.name!r}: explanations compare with this "
                    "site's own records; prepare the data set here ('insitu data prepare') or "
                    "start the server with one"
                )
            self._explainers[key] = Explainer(model, found[0], feature_names=found[1])
        return self._explainers[key]

    @contextlib.contextmanager
    def observed(
        self, name: str, endpoint: str, *, invalid: tuple[type[Exception], ...]
    ) -> Iterator[None]:
        """Count one request in the metrics: its status (500 unless known) and latency.

        ``invalid`` are the errors that answer 422.
        """
        started = time.perf_counter()
        status = 500
        try:
            yield
            status = 200
        except BodyError as exc:
            status = exc.status
            raise
        except invalid:
            status = 422
            raise
        except ModelNotFoundError:
            status = 404
            raise
        except MissingDependencyError:
            status = 501
            raise
        finally:
            # Metric labels only for served models: a fuzzer must not grow the registry.
            label = name if name in self.batchers else "-"
            self.metrics.observe_request(label, endpoint, status, time.perf_counter() - started)


class _Token:
    """The bearer token: a dependency (``required``), or checked by hand (``check_header``).

    ``/predict`` checks the token itself (FastAPI's dependency resolution costs more per
    request than the Adult MLP); its OpenAPI entry declares the same security scheme.
    """

    def __init__(self, token: str) -> None:
        self._expected = token.encode()
        bearer = HTTPBearer(auto_error=False, description="The token in keys/api-token.")

        async def authorized(
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
        ) -> None:
            self.check(credentials.credentials if credentials else "")

        self.required: params.Depends = Depends(authorized)

    def check(self, given: str) -> None:
        if not secrets.compare_digest(given.encode(), self._expected):
            raise BodyError(
                401,
                "missing or wrong bearer token; send 'Authorization: Bearer "
                "<keys/api-token of the workspace>'",
            )

    def check_header(self, request: Request) -> None:
        """Check the ``Authorization`` header of ``request``."""
        authorization = request.headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        self.check(credentials.strip() if scheme.lower() == "bearer" else "")


def create_app(
    runtime: ModelRuntime,
    *,
    token: str,
    routers: Sequence[APIRouter] = (),
    metrics: ServeMetrics | None = None,
    backgrounds: BackgroundSource | None = None,
    max_batch_rows: int = 256,
    max_wait: float = 0.001,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT,
) -> FastAPI:
    """The API app for ``runtime``, guarded by the bearer ``token``.

    ``routers`` are included as given (the site dashboard's); they read
    ``app.state.metrics`` (a :class:`ServeMetrics`: ``snapshot()``) and
    ``app.state.runtime``. The app starts the runtime (egress guard, watcher) when it
    starts and closes it when it stops. A body over ``max_body_bytes``, or not complete
    ``body_timeout`` seconds after the first read, is refused (413, 408).
    """
    if len(token) < 16:
        raise UsageError("the API token is too short; use Workspace.api_token()")
    metrics = metrics or ServeMetrics()
    state = _State(
        runtime,
        metrics,
        backgrounds,
        max_batch_rows=max_batch_rows,
        max_wait=max_wait,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
    )
    runtime.on_swap(lambda model: metrics.set_version(model.name, model.version))
    app = FastAPI(
        title="insitu local inference API",
        version="1",
        description="Models run on this machine, in memory; nothing leaves it.",
        lifespan=state.lifespan,
        docs_url=None,  # FastAPI's pages load their assets from CDNs: ours do not
        redoc_url=None,
    )
    add_offline_docs(app, title=app.title)
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.insitu = state
    guard = _Token(token)
    _add_error_handlers(app)
    _add_operations(app, state, guard)
    app.include_router(_models_router(state, guard))
    for router in routers:
        app.include_router(router)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"detail": ...}`` with its 4xx status."""

    @app.exception_handler(BodyError)
    async def _body_error(request: Request, exc: BodyError) -> JSONResponse:
        response = _error(exc.status, str(exc))
        if exc.unread:  # the rest of the body is never read: uvicorn must not drain it
            response.headers["Connection"] = "close"
        return response

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(UsageError)
    async def _usage(request: Request, exc: UsageError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ModelNotFoundError)
    async def _not_found(request: Request, exc: ModelNotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(MissingDependencyError)
    async def _not_installed(request: Request, exc: MissingDependencyError) -> JSONResponse:
        # A device install serves predictions; explanations need the 'serve' extra.
        return _error(501, str(exc))


def _add_operations(app: FastAPI, state: _State, guard: _Token) -> None:
    """``/healthz`` (no token) and ``/metrics``."""

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the server answers (no token needed, so it says nothing more)."""
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["operations"],
        dependencies=[guard.required],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: _ERRORS[401]},
    )
    async def prometheus() -> Response:
        """Prometheus text: requests, latency histogram, batch sizes, model versions."""
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def _models_router(state: _State, guard: _Token) -> APIRouter:
    """``/v1/models``: the list, predictions and explanations."""
    api = APIRouter(prefix="/v1", tags=["models"])
    guarded = [guard.required]

    @api.get("/models", dependencies=guarded, responses={401: _ERRORS[401]})
    async def models() -> dict[str, Any]:
        """The models served: name, version, input and output schema, metrics, privacy."""
        return {"models": await _describe(state.runtime)}

    @api.post(
        "/models/{name}/predict",
        openapi_extra={**_PREDICT_BODY, "security": [{"HTTPBearer": []}]},
        responses=_PREDICT_RESPONSES,
    )
    async def predict(name: str, request: Request) -> Response:
        """Predict a batch of rows (checked against the model card; micro-batched).

        Encoded rows (``inputs``, NPY, raw), or ``records`` by column name that the data
        schema in the model's signed card encodes. When the card carries a schema, the
        JSON answer adds ``predictions`` (label and probabilities, or value) and
        ``classes`` beside the raw ``outputs``.
        """
        with state.observed(name, "predict", invalid=(InvalidInputError,)):
            guard.check_header(request)
            model, outputs = await _predict(state, name, request)
            return _prediction(name, model, outputs, accept=request.headers.get("accept", ""))

    @api.post(
        "/models/{name}/explain",
        dependencies=guarded,
        openapi_extra=_EXPLAIN_BODY,
        responses=_EXPLAIN_RESPONSES,
        response_model=None,
    )
    async def explain(
        name: str,
        request: Request,
        resize: bool = False,
        format: Literal["json", "png"] | None = None,
        patch: Annotated[int | None, Query(ge=1, le=4096)] = None,
    ) -> Response:
        """Feature attributions (SHAP, against a background sample of this site's data).

        Image models (one input of (batch, C, H, W)) answer with an occlusion map over
        the ONNX session: the drop of the predicted class's score when each ``patch`` x
        ``patch`` square is hidden, one value per pixel; ``?format=png`` (or ``Accept:
        image/png``) returns it as a heat map over the image in grey, with its scale.
        They take an image file (raw or form field ``image``; ``?resize=true`` resizes
        one of another size) or the record's values (JSON, NPY).
        """
        with state.observed(name, "explain", invalid=(InvalidInputError, UsageError)):
            png = format == "png" or (
                format is None and "image/png" in request.headers.get("accept", "")
            )
            return await _explain(state, name, request, resize=resize, png=png, patch=patch)

    return api


async def _describe(runtime: ModelRuntime) -> list[dict[str, Any]]:
    listed = []
    for name in runtime.names:
        try:
            loaded = await run_in_threadpool(runtime.get, name)
            listed.append(loaded.describe())
        except InferenceError as exc:
            listed.append({"name": name, "version": None, "error": str(exc)})
    return listed


async def _predict(
    state: _State, name: str, request: Request
) -> tuple[LoadedModel, list[np.ndarray]]:
    """The outputs of model ``name`` for the body of ``request``, counted in its usage."""
    batcher = state.batchers.get(name)
    if batcher is None:
        raise _not_served(name)
    body = await state.body(request)
    content_type = request.headers.get("content-type", "")
    records = _records_of(body, content_type)
    if records is not None:
        return await _predict_records(state, name, records)
    image = image_of(body, content_type)
    inputs = decode_inputs(body, content_type, request.headers) if image is None else None
    runtime = state.runtime
    model = runtime.peek(name)
    if model is None:  # unloaded (idle, budget): load it off the event loop
        model = await run_in_threadpool(runtime.get, name)
    if image is not None:
        inputs = await _image_record(model, image, resize=_resize(request))
    try:
        feeds = model.check(inputs, max_rows=runtime.max_rows)
        described = RecordSchema.for_model(model)
        if described is not None and len(feeds) == 1:  # raw values sent as encoded ones
            described.check_encoded(next(iter(feeds.values())), row_name="inputs[{}]".format)
    except InvalidInputError:
        runtime.usage.add(name, model.version, requests=1, rows=0, errors=1)
        raise
    outputs = await batcher.submit(model, feeds)
    runtime.usage.add(name, model.version, requests=1, rows=len(outputs[0]), errors=0)
    return model, outputs


def _resize(request: Request) -> bool:
    """``?resize=true`` (read by hand: the predict path declares no query parameters)."""
    value = request.query_params.get("resize", "false").strip().lower()
    if value not in ("true", "1", "yes", "false", "0", "no"):
        raise BodyError(422, f"resize={value[:20]!r} is not a boolean; give true or false")
    return value in ("true", "1", "yes")


async def _image_record(model: LoadedModel, image: bytes, *, resize: bool) -> np.ndarray:
    """The record (1, C, H, W) an uploaded image file makes for ``model``.

    Raises:
        BodyError: 400 for an unreadable image, 413 for one over the pixel limit.
        InvalidInputError: the model takes no images, or one of another size (422).

    """
    described = ImageInput.from_card(model.card)
    if described is None:
        raise InvalidInputError(
            f"model {model.name!r} does not take images (its input is not (batch, C, H, "
            "W)); send rows as JSON, NPY or raw values"
        )
    try:
        return await run_in_threadpool(functools.partial(described.decode, image, resize=resize))
    except UnreadableImageError as exc:
        raise BodyError(413 if exc.too_large else 400, str(exc)) from None


def _records_of(body: bytes, content_type: str) -> list[Any] | None:
    """The ``records`` of a JSON body; ``None`` for any other body (``decode_inputs``'s).

    A body without the word ``"records"`` is never parsed here: encoded rows, the fast
    path, are parsed once.
    """
    kind = content_type.split(";", 1)[0].strip().lower() or "application/json"
    if kind != "application/json" or b'"records"' not in body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None  # decode_inputs names the problem
    if not isinstance(doc, dict) or "records" not in doc:
        return None
    if "inputs" in doc:
        raise BodyError(
            422, 'send "inputs" (encoded rows) or "records" (values by column name), not both'
        )
    records = doc["records"]
    if not isinstance(records, list) or not records:
        raise BodyError(
            422, '"records" must be a non-empty array of objects {"column": value, ...}'
        )
    return records


async def _predict_records(
    state: _State, name: str, records: list[Any]
) -> tuple[LoadedModel, list[np.ndarray]]:
    """The outputs of model ``name`` for ``records``, encoded by its card's data schema."""
    runtime = state.runtime
    model = runtime.peek(name)
    if model is None:
        model = await run_in_threadpool(runtime.get, name)
    try:
        if len(records) > runtime.max_rows:
            raise InvalidInputError(
                f"{len(records)} records; send 1 to {runtime.max_rows} per request (split "
                "larger inputs, or use 'insitu predict' for files)"
            )
        described = RecordSchema.require(model)
        encode = functools.partial(described.encode, records, row_name="records[{}]".format)
        # A few records encode faster than a thread hop; thousands would hold the loop.
        rows = encode() if len(records) <= _INLINE_RECORDS else await run_in_threadpool(encode)
        feeds = model.check(rows, max_rows=runtime.max_rows)
    except InvalidInputError:
        runtime.usage.add(name, model.version, requests=1, rows=0, errors=1)
        raise
    outputs = await state.batchers[name].submit(model, feeds)
    runtime.usage.add(name, model.version, requests=1, rows=len(outputs[0]), errors=0)
    return model, outputs


def _prediction(
    name: str, model: LoadedModel, outputs: list[np.ndarray], *, accept: str
) -> Response:
    """The outputs by name as JSON, or the first as NPY when ``accept`` asks for it."""
    headers = {"X-Insitu-Model": name, "X-Insitu-Version": model.version}
    if "application/x-npy" in accept:
        return Response(encode_npy(outputs[0]), media_type="application/x-npy", headers=headers)
    doc = {
        "model": name,
        "version": model.version,
        "outputs": {
            out: value.tolist() for out, value in zip(model.output_names, outputs, strict=False)
        },
    }
    described = RecordSchema.for_model(model)
    if described is not None and outputs:  # what the card's schema says the outputs mean
        answers = described.answers(outputs[0])
        doc |= answers.summary() | {"predictions": answers.to_json()}
    elif outputs:
        doc |= ImageInput.for_model(model).answers(outputs[0])
    return Response(json.dumps(doc), media_type="application/json", headers=headers)


async def _explain(
    state: _State, name: str, request: Request, *, resize: bool, png: bool, patch: int | None
) -> Response:
    """The attributions of model ``name`` for the body of ``request``."""
    runtime = state.runtime
    if name not in runtime.names:
        raise _not_served(name)
    body = await state.body(request)
    content_type = request.headers.get("content-type", "") or "application/json"
    model = await run_in_threadpool(runtime.get, name)
    if len(model.inputs) == 1 and len(model.input.shape) in (3, 4):  # images, signals
        return await _explain_image(model, body, request, resize=resize, png=png, patch=patch)
    if png:
        raise BodyError(406, f"model {name!r} does not take images: its explanations are JSON only")
    if not content_type.lower().startswith("application/json"):
        raise BodyError(
            415, 'explanations take a JSON body {"inputs": [[...]]} or {"records": [{...}]}'
        )
    records = _records_of(body, content_type)
    described = RecordSchema.require(model) if records is not None else None
    if described is not None and records is not None:
        if len(records) > MAX_EXPLAIN_ROWS:
            raise InvalidInputError(
                f"{len(records)} records; explanations take 1 to {MAX_EXPLAIN_ROWS} per request"
            )
        encode = functools.partial(described.encode, records, row_name="records[{}]".format)
        inputs: Any = await run_in_threadpool(encode)
    else:
        inputs = decode_inputs(body, content_type, request.headers)
    explainer = await run_in_threadpool(state.explainer, model)
    explanation = await run_in_threadpool(explainer.explain, inputs)
    doc = {"model": name, "version": model.version, **explanation.to_json()}
    if described is not None:  # the shares of the record's own columns, summed
        doc["by_column"] = described.by_column(explanation.values)
    return JSONResponse(doc)


async def _explain_image(
    model: LoadedModel,
    body: bytes,
    request: Request,
    *,
    resize: bool,
    png: bool,
    patch: int | None,
) -> Response:
    """The occlusion map of one image (a file, or its values as JSON or NPY) or signal."""
    content_type = request.headers.get("content-type", "")
    image = image_of(body, content_type)
    if image is not None:
        inputs: Any = await _image_record(model, image, resize=resize)
    else:
        inputs = decode_inputs(body, content_type, request.headers)
    feeds = model.check(inputs, max_rows=1, cast=True)
    record = next(iter(feeds.values()))[0]
    explain = functools.partial(explain_image, model, record, patch=patch)
    explanation = await run_in_threadpool(explain)
    headers = {
        "X-Insitu-Model": model.name,
        "X-Insitu-Version": model.version,
        "X-Insitu-Class": str(explanation.target),
    }
    if png:
        picture = await run_in_threadpool(explanation.png)
        return Response(picture, media_type="image/png", headers=headers)
    doc = {"model": model.name, "version": model.version, **explanation.to_json()}
    return JSONResponse(doc, headers=headers)
