"""Smoke check of a freshly built module image, before it is pushed.

The image runs in a throwaway container with port 5001 published on a free loopback port; it must
report ready on ``/v2/health/ready`` (model loaded, ``init()`` done), answer ``GET /``, and, when
the inference config has an input sample, score it. Any failure raises ``SmokeTestError`` with the
container's log tail. The container is always removed.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from cloud.packaging.errors import EngineError, SmokeTestError
from cloud.packaging.progress import Progress

READY_PATH = "/v2/health/ready"
LOG_TAIL_LINES = 25
NO_PORT_GRACE_S = 3.0
"""A running container without a host port for 5001/tcp after this long will never get one."""


@dataclass(frozen=True)
class SmokeResult:
    """How the smoke check went."""

    ready_after_s: float
    health: str
    score_status: int | None


def http_call(url: str, data: bytes | None = None, timeout_s: float = 5.0) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(
        url, data=data, headers=headers, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def _log_tail(container: Container) -> str:
    try:
        raw = container.logs(tail=LOG_TAIL_LINES)
    except docker.errors.APIError:
        return ""
    return raw.decode("utf-8", "replace").rstrip()


def _published(container: Container) -> dict[str, Any]:
    return dict((container.attrs.get("NetworkSettings") or {}).get("Ports") or {})


def _host_port(container: Container) -> int | None:
    bindings = _published(container).get("5001/tcp") or []
    for b in bindings:
        if b.get("HostPort"):
            return int(b["HostPort"])
    return None


def start_module(client: docker.DockerClient, image: str, what: str, **options: Any) -> Container:
    """Run ``image`` detached with port 5001 on a free loopback port (Docker picks it)."""
    try:
        return client.containers.run(
            image,
            detach=True,
            ports={"5001/tcp": ("127.0.0.1",)},
            labels={"io.edgedeploy.smoke": "1"},
            **options,
        )
    except docker.errors.ImageNotFound:
        raise EngineError(f"{what}: image {image} is not in Docker Engine") from None
    except docker.errors.APIError as exc:
        raise EngineError(f"{what}: docker could not start {image}: {exc.explanation or exc}") from None


def remove_container(container: Container) -> None:
    """Remove a container and its anonymous volumes, ignoring one that is already gone."""
    with contextlib.suppress(docker.errors.APIError):
        container.remove(force=True, v=True)


def wait_ready(container: Container, what: str, timeout_s: float) -> int:
    """Wait until the module answers 200 on ``/v2/health/ready``; return its host port."""
    started = time.monotonic()
    port: int | None = None
    last = "no answer yet"
    while True:
        container.reload()
        if container.status in ("exited", "dead"):
            code = container.attrs.get("State", {}).get("ExitCode")
            raise _fail(container, what, f"the module exited with code {code} before it was ready")
        port = port or _host_port(container)
        if port is None and container.status == "running" and time.monotonic() - started > NO_PORT_GRACE_S:
            mode = (container.attrs.get("HostConfig") or {}).get("NetworkMode", "?")
            published = ", ".join(sorted(_published(container))) or "none"
            raise _fail(
                container,
                what,
                "Docker Engine published no host port for the module's port 5001/tcp "
                f"(network mode {mode}, published ports: {published}): nothing can reach it",
            )
        if port is not None:
            try:
                code, body = http_call(f"http://127.0.0.1:{port}{READY_PATH}", timeout_s=2.0)
                if code == 200:
                    return port
                last = f"{READY_PATH} answered {code}: {body.strip()[:200]}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = f"{READY_PATH}: {getattr(exc, 'reason', exc)}"
        if time.monotonic() - started > timeout_s:
            raise _fail(container, what, f"not ready after {timeout_s:.0f} s (last: {last})")
        time.sleep(0.2)


def smoke_run(
    client: docker.DockerClient,
    image: str,
    what: str,
    progress: Progress,
    *,
    input_sample: Any = None,
    timeout_s: float = 120.0,
) -> SmokeResult:
    """Run ``image`` once and check it serves; ``what`` names it in messages (``digits 3 (cpu)``)."""
    progress.step(f"smoke check: starting {what} in a throwaway container")
    container = start_module(
        client, image, f"smoke check of {what}", environment={"EXIT_ON_INIT_FAILURE": "1"}
    )
    started = time.monotonic()
    try:
        port = wait_ready(container, what, timeout_s)
        ready_after = time.monotonic() - started
        return _check(container, port, what, progress, input_sample, ready_after)
    finally:
        remove_container(container)


def _fail(container: Container, what: str, reason: str) -> SmokeTestError:
    tail = _log_tail(container)
    return SmokeTestError(f"smoke check of {what} failed: {reason}", tail)


def _check(
    container: Container, port: int, what: str, progress: Progress, input_sample: Any, ready_after: float
) -> SmokeResult:
    code, health = http_call(f"http://127.0.0.1:{port}/")
    if code != 200:
        raise _fail(container, what, f"GET / answered {code}: {health.strip()[:200]}")
    score_status = None
    if input_sample is not None:
        payload = input_sample if isinstance(input_sample, str) else json.dumps(input_sample)
        score_status, body = http_call(
            f"http://127.0.0.1:{port}/score", data=payload.encode(), timeout_s=60.0
        )
        if score_status != 200:
            raise _fail(
                container, what, f"POST /score with the input sample answered {score_status}: {body[:200]}"
            )
    progress.step(
        f"smoke check passed: ready after {ready_after:.1f} s, GET / → {health.strip()[:40]!r}"
        + (f", sample scored ({score_status})" if score_status is not None else "")
    )
    return SmokeResult(ready_after, health.strip(), score_status)
