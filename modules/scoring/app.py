"""HTTP routes of the scoring server (aiohttp). Handlers stay thin; ``ScoringService`` does the work.

Routes: ``GET /`` (liveness), ``POST /score`` (GET/OPTIONS too for raw-request scripts),
``GET /swagger.json``, ``GET /metrics`` and the Open Inference Protocol v2 under ``/v2``. Every
error is a JSON ``{"error": ..., "request_id": ...}``; health routes never wait for inference.
Scoring answers carry ``X-Request-Id``: the client's own, else a per-process random prefix and a
counter (cheaper than a UUID per request); error logs name it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from aiohttp import web

from modules.contract import INSTANCE_HEADER
from modules.scoring.auth import KeyCheck
from modules.scoring.backends import BackendError
from modules.scoring.config import ServerConfig
from modules.scoring.metrics import CONTENT_TYPE as METRICS_TYPE
from modules.scoring.metrics import Metrics, merge_expositions, workers_lines
from modules.scoring.openapi import build_document
from modules.scoring.pool import InferencePool, PoolBusy, PoolClosed, PoolTimeout
from modules.scoring.replies import ClientError, Reply, dumps
from modules.scoring.service import Readiness, ScoreCall, ScoringService
from modules.scoring.siblings import Siblings

log = logging.getLogger("modules.scoring")
T = TypeVar("T")

SERVER_NAME = "edgedeploy-scoring"
_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    500: "run_error",
    503: "unavailable",
    504: "timeout",
}
_JSON_HEADERS = {"Content-Type": "application/json"}


async def _in_daemon_thread(func: Callable[[], T]) -> T:
    """Run ``func`` in a daemon thread, so a hung init() never keeps the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = func(), None
        except Exception as exc:
            result, error = None, exc
        except BaseException as exc:  # SystemExit from a script must not stop the server from here
            result, error = None, RuntimeError(f"{type(exc).__name__} raised: {exc}")
        with contextlib.suppress(RuntimeError):  # the loop closed while init() ran
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="scoring-init", daemon=True).start()
    return await future


def _server_version() -> str:
    try:
        return version("edgedeploy")
    except PackageNotFoundError:
        return "0"


def error_response(status: int, message: str, request_id: str | None = None, **headers: str) -> web.Response:
    """A JSON error ``{"error": message, "request_id": ...}``."""
    body: dict[str, Any] = {"error": message}
    if request_id is not None:
        body["request_id"] = request_id
        headers["X-Request-Id"] = request_id
    return web.Response(body=dumps(body), status=status, headers={**_JSON_HEADERS, **headers})


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, headers=_JSON_HEADERS)


def _reply_response(reply: Reply, request_id: str) -> web.Response:
    headers = {"Content-Type": reply.content_type, "X-Request-Id": request_id}
    if reply.headers:
        headers.update(reply.headers)
    return web.Response(body=reply.body, status=reply.status, headers=headers)


class ScoringApp:
    """The server's state and handlers: one per process."""

    def __init__(self, config: ServerConfig, service: ScoringService, metrics: Metrics | None = None) -> None:
        self.config = config
        self.service = service
        self.metrics = metrics or Metrics()
        self.readiness = Readiness()
        self.pool = InferencePool(config.threads, config.max_queue, config.timeout_s)
        self.key = KeyCheck(config.scoring_key) if config.scoring_key else None
        self._swagger: bytes | None = None
        self.siblings = Siblings(config.worker, self.metrics.render) if config.worker else None
        """The other worker processes on this port (``SCORING_WORKERS`` > 1), else None."""
        self._id_prefix = f"{secrets.token_hex(4)}-"
        self._ids = itertools.count(1)
        self.metrics.gauges["scoring_inference_threads"] = (
            "Worker threads for inference.",
            lambda: self.pool.threads,
        )
        self.metrics.gauges["scoring_inference_running"] = (
            "Inferences holding a thread now.",
            lambda: self.pool.running,
        )
        self.metrics.gauges["scoring_inference_queued"] = (
            "Requests waiting for a thread.",
            lambda: self.pool.queued,
        )

    async def load(self) -> bool:
        """Load the model / run init() in a daemon thread (never on the loop); True when it worked."""
        started = time.perf_counter()
        try:
            providers = await _in_daemon_thread(self.service.load)
        except Exception as exc:
            self.readiness.error = f"{type(exc).__name__}: {exc}"
            trace = None if isinstance(exc, BackendError) else exc
            log.error("scoring initialisation failed: %s", self.readiness.error, exc_info=trace)
            if self.siblings is not None:
                self.siblings.mark(False, self.readiness.error)
            return False
        seconds = time.perf_counter() - started
        # Everything loaded so far (modules, the model, init()'s objects) lives as long as the
        # process: keep it out of the cyclic collector, so later collections only walk what
        # requests allocate instead of pausing tens of milliseconds on every full collection.
        gc.collect()
        gc.freeze()
        self.metrics.families.update(self.service.metric_families())
        self.readiness.providers = providers
        self.readiness.init_seconds = seconds
        self.metrics.providers.update(providers)
        self.metrics.init_seconds = seconds
        self.metrics.ready = self.readiness.ready = True
        self._swagger = None
        if self.siblings is not None:
            self.siblings.mark(True)
        return True

    def application(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(middlewares=[self._observe], client_max_size=self.config.max_request_bytes)
        if self.config.instance is not None:
            app.on_response_prepare.append(self._name_instance)
        score_methods = ("POST", "GET", "OPTIONS")
        app.router.add_get("/", self.live_text)
        for method in score_methods:
            app.router.add_route(method, "/score", self.score)
        app.router.add_get("/swagger.json", self.swagger)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/models/{name}", self.model_metadata)
        app.router.add_get("/v2/models/{name}/ready", self.model_ready)
        app.router.add_post("/v2/models/{name}/infer", self.infer)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _name_instance(self, _request: web.Request, response: web.StreamResponse) -> None:
        """Say which instance answers (the agent's probes check it is the one they started)."""
        assert self.config.instance is not None
        response.headers[INSTANCE_HEADER] = self.config.instance

    async def _cleanup(self, _app: web.Application) -> None:
        """After the last request: let the worker threads go."""
        if self.siblings is not None:
            await self.siblings.stop()
        self.pool.shutdown()
        self.service.close()

    @web.middleware
    async def _observe(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = self._http_error(request, exc)
        except Exception as exc:
            log.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
            response = error_response(500, "internal server error; see the server log")
        finally:
            metrics.in_flight -= 1
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.observe(route, response.status, time.perf_counter() - started)
        if response.status >= 400:
            metrics.error(
                route, response.get("reason") or _REASONS.get(response.status, f"http_{response.status}")
            )
        return response

    def _http_error(self, request: web.Request, exc: web.HTTPException) -> web.Response:
        if exc.status == 404:
            return error_response(404, f"no route {request.path}: see /swagger.json for the routes")
        if exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            return error_response(405, f"{request.method} is not allowed on {request.path}", Allow=allowed)
        if exc.status == 413:
            return self._too_large(request)
        return error_response(exc.status, exc.reason)

    def _too_large(self, request: web.Request, request_id: str | None = None) -> web.Response:
        limit = self.config.max_request_bytes
        return error_response(
            413, f"the request body is larger than the limit of {limit} bytes (MAX_REQUEST_BYTES)", request_id
        )

    # --- health -------------------------------------------------------------------------------

    async def live_text(self, _request: web.Request) -> web.Response:
        """``GET /``: liveness, always immediate."""
        return web.Response(text="Healthy")

    async def live(self, _request: web.Request) -> web.Response:
        """``GET /v2/health/live``."""
        return _json({"live": True})

    def _not_ready(self) -> str | None:
        """None when this process and every other worker on the port are ready, else why not."""
        if not self.readiness.ready:
            return self.readiness.reason()
        return self.siblings.not_ready() if self.siblings is not None else None

    async def ready(self, _request: web.Request) -> web.Response:
        """``GET /v2/health/ready``: 200 once loaded (every worker), else 503 with the reason."""
        reason = self._not_ready()
        if reason is None:
            return _json({"ready": True})
        return _json({"ready": False, "reason": reason}, 503)

    # --- scoring ------------------------------------------------------------------------------

    def _request_id(self, request: web.Request) -> str:
        """The caller's ``X-Request-Id``, else a new one: every answer to a scoring route carries it."""
        return request.headers.get("X-Request-Id") or f"{self._id_prefix}{next(self._ids):x}"

    def _refuse(self, request: web.Request, request_id: str) -> web.Response | None:
        """The answer when the request may not be scored (auth, readiness), else None."""
        if self.key is not None and request.method != "OPTIONS":
            authorization = request.headers.get("Authorization")
            if not self.key.allows(authorization):
                return error_response(
                    401, KeyCheck.problem(authorization), request_id, **{"WWW-Authenticate": "Bearer"}
                )
        if not self.readiness.ready:
            response = error_response(
                503, f"not ready: {self.readiness.reason()}", request_id, **{"Retry-After": "1"}
            )
            response["reason"] = "not_ready"
            return response
        return None

    async def _call(self, request: web.Request, request_id: str) -> ScoreCall | web.Response:
        length = request.content_length
        if length is not None and length > self.config.max_request_bytes:
            return self._too_large(request, request_id)
        body = await request.read()
        return ScoreCall(
            request.method, request.path, request.headers, request.query, request.query_string, body
        )

    async def _run(self, request_id: str, work: Awaitable[Reply]) -> web.Response:
        try:
            reply = await work
        except ClientError as exc:
            return error_response(exc.status, exc.message, request_id)
        except PoolTimeout:
            log.warning("request_id=%s did not finish within %s s", request_id, self.config.timeout_s)
            return error_response(
                504,
                f"scoring did not finish within {self.config.timeout_s:g} s (SCORING_TIMEOUT)",
                request_id,
            )
        except PoolClosed:
            return error_response(503, "the server is shutting down", request_id)
        except PoolBusy:
            response = error_response(
                503,
                f"busy: {self.config.max_queue} requests already waiting (SCORING_MAX_QUEUE)",
                request_id,
                **{"Retry-After": "1"},
            )
            response["reason"] = "busy"
            return response
        except Exception as exc:
            log.error("scoring failed request_id=%s", request_id, exc_info=exc)
            return error_response(500, f"scoring failed: {type(exc).__name__}: {exc}", request_id)
        return _reply_response(reply, request_id)

    async def score(self, request: web.Request) -> web.Response:
        """``/score``: the entry script's run() or the ONNX model."""
        request_id = self._request_id(request)
        refused = self._refuse(request, request_id)
        if refused is not None:
            return refused
        if request.method != "POST" and not self.service.accepts_raw_methods:
            return error_response(
                405,
                f"{request.method} /score needs a raw-request (@rawhttp) entry script; use POST",
                request_id,
                Allow="POST",
            )
        call = await self._call(request, request_id)
        if isinstance(call, web.Response):
            return call
        return await self._run(request_id, self.service.handle_score(call, self.pool))

    async def infer(self, request: web.Request) -> web.Response:
        """``POST /v2/models/{name}/infer``: Open Inference Protocol inference."""
        name = request.match_info["name"]
        if self.service.metadata(name) is None:
            return error_response(404, f"no model {name!r} (models: {', '.join(self.service.model_names())})")
        request_id = self._request_id(request)
        refused = self._refuse(request, request_id)
        if refused is not None:
            return refused
        call = await self._call(request, request_id)
        if isinstance(call, web.Response):
            return call
        return await self._run(request_id, self.service.handle_infer(name, call, self.pool))

    # --- metadata -----------------------------------------------------------------------------

    async def server_metadata(self, _request: web.Request) -> web.Response:
        """``GET /v2``."""
        extensions = ["binary_tensor_data"] if self.service.mode == "no-code" else []
        return _json({"name": SERVER_NAME, "version": _server_version(), "extensions": extensions})

    async def model_metadata(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{name}``."""
        name = request.match_info["name"]
        metadata = self.service.metadata(name)
        if metadata is None:
            return error_response(404, f"no model {name!r} (models: {', '.join(self.service.model_names())})")
        return _json(metadata)

    async def model_ready(self, request: web.Request) -> web.Response:
        """``GET /v2/models/{name}/ready``."""
        name = request.match_info["name"]
        if self.service.metadata(name) is None:
            return error_response(404, f"no model {name!r} (models: {', '.join(self.service.model_names())})")
        ready = self._not_ready() is None
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def swagger(self, _request: web.Request) -> web.Response:
        """``GET /swagger.json``: OpenAPI 3."""
        if self._swagger is None:
            document = build_document(
                title=self.config.module_name,
                version=self.config.module_version,
                schemas=self.service.api_schemas(),
                models=self.service.model_names(),
                secured=self.key is not None,
                infer=self.service.mode == "no-code",
            )
            self._swagger = dumps(document)
        return web.Response(body=self._swagger, headers=_JSON_HEADERS)

    async def metrics_text(self, _request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text format, every worker's figures summed."""
        text = self.metrics.render()
        if self.siblings is not None:
            others = await self.siblings.gather_metrics()
            text = merge_expositions([text, *others]) + workers_lines(
                self.siblings.slot.count, 1 + len(others)
            )
        return web.Response(body=text.encode(), headers={"Content-Type": METRICS_TYPE})
