"""The localhost API (FastAPI): models, predictions, explanations, health and metrics.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``)::

    GET  /healthz                        liveness, no token
    GET  /metrics                        Prometheus text format          (token)
    GET  /v1/models                      models served and their cards   (token)
    POST /v1/models/{name}/predict       JSON, NPY or raw body           (token)
    POST /v1/models/{name}/explain       JSON body, SHAP attributions    (token)

Every error is JSON ``{"detail": "<problem>; <fix>"}`` with a 4xx status: 400 for a
body that cannot be read, 401 for a missing or wrong token, 404 for an unknown model,
413 for an oversize body, 415 for an unknown content type, 422 for inputs that do not
fit the model card. A 5xx means a bug (or a model that fails on valid input).

The predict path is written for speed: the body is read and decoded by hand (no
Pydantic model for the rows: JSON and validation of thousands of floats would cost more
than the model), and the OpenAPI document describes it with ``openapi_extra``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from insitu.errors import InferenceError, InvalidInputError, ModelNotFoundError, UsageError
from insitu.runtime import Explainer, LoadedModel, ModelRuntime
from insitu.serve._batching import MicroBatcher
from insitu.serve._codec import BodyError, decode_inputs, encode_npy
from insitu.serve._metrics import ServeMetrics

__all__ = ["Background", "BackgroundSource", "create_app"]

logger = logging.getLogger(__name__)

#: A background sample for explanations, and its feature names (or ``None``).
Background = tuple[np.ndarray, list[str] | None]
BackgroundSource = Mapping[str, Background] | Callable[[str], Background | None]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The body cannot be read (malformed JSON, NPY or raw values)."},
    401: {"description": "Missing or wrong bearer token."},
    404: {"description": "No model of that name."},
    413: {"description": "The body is larger than the server accepts."},
    415: {"description": "Unsupported content type."},
    422: {"description": "Inputs that do not fit the model card (shape, dtype, NaN/inf)."},
}
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
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _INPUTS_SCHEMA},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_EXPLAIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _INPUTS_SCHEMA}},
    }
}


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


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
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.backgrounds = backgrounds
        self.max_body_bytes = max_body_bytes
        self.batchers = {
            name: MicroBatcher(
                runtime, name, metrics=metrics, max_batch_rows=max_batch_rows, max_wait=max_wait
            )
            for name in runtime.names
        }
        self._explainers: dict[tuple[str, str], Explainer] = {}

    async def body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise BodyError(413, f"the body is {length} bytes; the limit is {self.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyError(413, f"the body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

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


def create_app(  # noqa: PLR0915 -- the endpoints are defined together
    runtime: ModelRuntime,
    *,
    token: str,
    routers: Sequence[APIRouter] = (),
    metrics: ServeMetrics | None = None,
    backgrounds: BackgroundSource | None = None,
    max_batch_rows: int = 256,
    max_wait: float = 0.001,
    max_body_bytes: int = 16 << 20,
) -> FastAPI:
    """The API app for ``runtime``, guarded by the bearer ``token``.

    ``routers`` are included as given (the site dashboard's); they read
    ``app.state.metrics`` (a :class:`ServeMetrics`: ``snapshot()``) and
    ``app.state.runtime``. The app starts the runtime (egress guard, watcher) when it
    starts and closes it when it stops.
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
    )
    runtime.on_swap(lambda model: metrics.set_version(model.name, model.version))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        for name in runtime.names:
            try:
                await run_in_threadpool(runtime.get, name)
            except InferenceError as exc:
                logger.warning("%s is not available yet: %s", name, exc)
        try:
            yield
        finally:
            for batcher in state.batchers.values():
                await batcher.stop()
            runtime.close()

    app = FastAPI(
        title="insitu local inference API",
        version="1",
        description="Models run on this machine, in memory; nothing leaves it.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.insitu = state
    bearer = HTTPBearer(auto_error=False, description="The token in keys/api-token.")

    expected = token.encode()

    def check_token(given: str) -> None:
        if not secrets.compare_digest(given.encode(), expected):
            raise BodyError(
                401,
                "missing or wrong bearer token; send 'Authorization: Bearer "
                "<keys/api-token of the workspace>'",
            )

    async def authorized(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        check_token(credentials.credentials if credentials else "")

    @app.exception_handler(BodyError)
    async def _body_error(request: Request, exc: BodyError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(InvalidInputError)
    async def _invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(UsageError)
    async def _usage(request: Request, exc: UsageError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ModelNotFoundError)
    async def _not_found(request: Request, exc: ModelNotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the server answers (no token needed)."""
        return {"status": "ok", "models": runtime.names}

    @app.get(
        "/metrics",
        tags=["operations"],
        dependencies=[Depends(authorized)],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: _ERRORS[401]},
    )
    async def prometheus() -> Response:
        """Prometheus text: requests, latency histogram, batch sizes, model versions."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def _label(name: str) -> str:
        # Metric labels only for served models: a fuzzer must not grow the registry.
        return name if name in state.batchers else "-"

    # /predict checks the token itself (FastAPI's dependency resolution costs more per
    # request than the Adult MLP); its OpenAPI entry declares the same security scheme.
    api = APIRouter(prefix="/v1", tags=["models"])
    guarded = [Depends(authorized)]

    @api.get("/models", dependencies=guarded, responses={401: _ERRORS[401]})
    async def models() -> dict[str, Any]:
        """The models served: name, version, input and output schema, metrics, privacy."""
        listed = []
        for name in runtime.names:
            try:
                loaded = await run_in_threadpool(runtime.get, name)
                listed.append(loaded.describe())
            except InferenceError as exc:
                listed.append({"name": name, "version": None, "error": str(exc)})
        return {"models": listed}

    @api.post(
        "/models/{name}/predict",
        openapi_extra={**_PREDICT_BODY, "security": [{"HTTPBearer": []}]},
        responses={
            200: {
                "description": "Outputs by name (JSON), or the first output as NPY "
                "when the request sends 'Accept: application/x-npy'.",
                "content": {
                    "application/json": {},
                    "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_ERRORS,
        },
    )
    async def predict(name: str, request: Request) -> Response:
        """Predict a batch of rows (checked against the model card; micro-batched)."""
        started = time.perf_counter()
        status = 500
        try:
            authorization = request.headers.get("authorization", "")
            scheme, _, credentials = authorization.partition(" ")
            check_token(credentials.strip() if scheme.lower() == "bearer" else "")
            batcher = state.batchers.get(name)
            if batcher is None:
                raise ModelNotFoundError(
                    f"no model named {name!r}; GET /v1/models lists those served"
                )
            body = await state.body(request)
            inputs = decode_inputs(body, request.headers.get("content-type", ""), request.headers)
            model = runtime.peek(name)
            if model is None:  # unloaded (idle, budget): load it off the event loop
                model = await run_in_threadpool(runtime.get, name)
            try:
                feeds = model.check(inputs, max_rows=runtime.max_rows)
            except InvalidInputError:
                runtime.usage.add(name, model.version, requests=1, rows=0, errors=1)
                raise
            outputs = await batcher.submit(model, feeds)
            runtime.usage.add(name, model.version, requests=1, rows=len(outputs[0]), errors=0)
            headers = {"X-Insitu-Model": name, "X-Insitu-Version": model.version}
            status = 200
            if "application/x-npy" in request.headers.get("accept", ""):
                return Response(
                    encode_npy(outputs[0]), media_type="application/x-npy", headers=headers
                )
            doc = {
                "model": name,
                "version": model.version,
                "outputs": {
                    out: value.tolist()
                    for out, value in zip(model.output_names, outputs, strict=False)
                },
            }
            return Response(json.dumps(doc), media_type="application/json", headers=headers)
        except BodyError as exc:
            status = exc.status
            raise
        except InvalidInputError:
            status = 422
            raise
        except ModelNotFoundError:
            status = 404
            raise
        finally:
            metrics.observe_request(_label(name), "predict", status, time.perf_counter() - started)

    @api.post(
        "/models/{name}/explain",
        dependencies=guarded,
        openapi_extra=_EXPLAIN_BODY,
        responses=_ERRORS,
    )
    async def explain(name: str, request: Request) -> dict[str, Any]:
        """Feature attributions (SHAP, against a background sample of this site's data)."""
        started = time.perf_counter()
        status = 500
        try:
            if name not in runtime.names:
                raise ModelNotFoundError(
                    f"no model named {name!r}; GET /v1/models lists those served"
                )
            body = await state.body(request)
            content_type = request.headers.get("content-type", "") or "application/json"
            if not content_type.lower().startswith("application/json"):
                raise BodyError(415, 'explanations take a JSON body {"inputs": [[...]]}')
            inputs = decode_inputs(body, content_type, request.headers)
            model = await run_in_threadpool(runtime.get, name)
            explainer = await run_in_threadpool(state.explainer, model)
            explanation = await run_in_threadpool(explainer.explain, inputs)
            status = 200
            return {"model": name, "version": model.version, **explanation.to_json()}
        except BodyError as exc:
            status = exc.status
            raise
        except (InvalidInputError, UsageError):
            status = 422
            raise
        except ModelNotFoundError:
            status = 404
            raise
        finally:
            metrics.observe_request(_label(name), "explain", status, time.perf_counter() - started)

    app.include_router(api)
    for router in routers:
        app.include_router(router)
    return app
