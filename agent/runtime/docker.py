"""``DockerRuntime``: modules as Docker Engine containers, through the ``docker`` SDK (7.x).

Each module runs in a container named ``<prefix><module>`` (``edge-<device>-<module>`` by default), labelled
as this agent's (``agent/runtime/labels.py``); containers without those labels are never listed,
started, stopped or removed. Containers get restart policy ``no``: the agent restarts modules
itself (back-off, health, rollback). Ports are published on the mapping's ``host_ip``, loopback
unless the desired state says otherwise. A device profile's ``container`` section adds GPUs,
device nodes, cgroup rules, volumes and groups.

Pulls run in the background (``PullTracker``) and are skipped when the image is already local,
by digest for pinned references, so a device boots offline from what it has. With a
``RegistryPuller`` (``pull.method: resumable``, the agent's default) the agent downloads the blobs
itself (resuming, verified, ``agent/runtime/registry_pull.py``) and streams them into ``docker
load`` (``agent/runtime/image_load.py``); a pinned reference is then tagged ``<repo>:sha256-<hex>``
(``labels.loaded_tag``), which counts as present. Without one, Docker Engine pulls. Registry
credentials are the cloud's, sealed to this device (opened with ``sealing_key``), or looked up by
``RegistryCredentialRef.secret`` in the mapping given at construction (``agent/credentials.py``).
All SDK calls run in worker threads.

Memory: the SDK's ``requests`` would import ``charset_normalizer`` (about 4 MB resident with the
codecs it loads) only to guess the encoding of responses that declare none. Docker Engine's
answers all do (JSON is UTF-8), and ``requests`` falls back to UTF-8 without it, so it is kept
out when ``requests`` is first imported here (``_requests_without_charset_detection``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import uuid
import warnings
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.credentials import CredentialError, Credentials, pull_auth
from agent.observed import ObservedModule, ObservedStatus
from agent.runtime import Observation, RuntimeActionError
from agent.runtime import labels as lb
from agent.runtime.access import AccessError, docker_access
from agent.runtime.image_gc import ImageBook, PulledRecord, collect, sweep_partials, unreferenced_blobs
from agent.runtime.image_load import docker_archive
from agent.runtime.pulls import PullTracker
from agent.runtime.registry_pull import PulledImage, RegistryPuller
from modules.contract import INSTANCE_ENV, DesiredModule, DeviceProfile, HealthCheck


def _requests_without_charset_detection() -> None:
    """Import ``requests`` with ``charset_normalizer`` hidden (a no-op once either is loaded)."""
    if "requests" in sys.modules or "charset_normalizer" in sys.modules:
        return
    sys.modules["charset_normalizer"] = None  # type: ignore[assignment]  # import fails: not used
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unable to find acceptable character detection")
            import requests  # noqa: F401
    finally:
        del sys.modules["charset_normalizer"]  # later imports elsewhere in the process work again


_requests_without_charset_detection()

import docker  # noqa: E402  (after the function above)
import docker.errors  # noqa: E402
from docker.types import LogConfig  # noqa: E402

log = logging.getLogger(__name__)

_STATES: frozenset[str] = frozenset(
    {"created", "running", "paused", "restarting", "removing", "exited", "dead"}
)
_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def parse_docker_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 timestamps (nanoseconds) as aware datetimes; ``None`` for the zero time."""
    if not value or value.startswith("0001-01-01"):
        return None
    m = _TIME_RE.match(value)
    if m is None:
        return None
    base, frac, zone = m.groups()
    text = base + (f".{frac[:6]:0<6}" if frac else "") + ("+00:00" if zone == "Z" else zone)
    return datetime.fromisoformat(text).astimezone(timezone.utc)


def _repo_digest(image: str, repo_digests: list[str]) -> str | None:
    """The ``sha256:`` manifest digest the image has in ``image``'s own repository, or None.

    A digest from another repository is not used: a locally built or retagged image has none
    of its own, and another registry may hold a differently encoded manifest of it.
    """
    try:
        repo = lb.familiar_name(image)
    except ValueError:
        return None
    own = [r for r in repo_digests if r.split("@", 1)[0] == repo]
    return own[0].split("@", 1)[1] if own else None


def _loaded_digests(tags: list[str]) -> list[str]:
    """``repo@sha256:<hex>`` for each ``repo:sha256-<hex>`` tag (``labels.loaded_tag``): the
    manifest digest the agent verified when it pulled and loaded the image, which a load cannot
    record as a repository digest."""
    found = []
    for tag in tags:
        repo, _, name = tag.rpartition(":")
        if repo and _LOADED_TAG.fullmatch(name):
            found.append(f"{repo}@{name.replace('-', ':', 1)}")
    return found


_LOADED_TAG = re.compile(r"sha256-[0-9a-f]{64}")


def _error_text(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError):
        return str(exc.explanation or exc)
    return f"{type(exc).__name__}: {exc}"


class DockerRuntime:
    """Runs this agent's modules as containers on the local Docker Engine."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        profiles: Mapping[str, DeviceProfile] | None = None,
        credentials: Credentials | None = None,
        sealing_key: X25519PrivateKey | None = None,
        device_id: str | None = None,
        name_prefix: str | None = None,
        stop_timeout_s: int = 10,
        host_root: Path = Path("/"),
        log_max_size: str = "10m",
        log_max_files: int = 3,
        init: bool = True,
        puller: RegistryPuller | None = None,
        pulls: PullTracker | None = None,
        images: ImageBook | None = None,
        gc_grace: timedelta = timedelta(days=1),
    ) -> None:
        """``device_id`` labels (and filters) containers so several agents may share one engine, and
        names them ``edge-<device>-<module>`` unless ``name_prefix`` says otherwise;
        ``host_root`` is where the profile's device nodes are looked up; logs rotate at
        ``log_max_size`` keeping ``log_max_files`` files; ``init`` runs Docker's init (tini) as
        PID 1, so SIGTERM reaches a server that has not installed its handler yet; ``puller``: pull
        with the agent's resumable client instead of Docker Engine's; ``pulls``: the tracker (with
        the update window), a plain one when not given; ``images``: the book of the images this
        agent pulled, which ``collect_images`` removes ``gc_grace`` after nothing needs them (no
        book: nothing is ever removed)."""
        if profiles is None:
            from modules.profiles import load_profiles

            profiles = load_profiles()
        self.client = client or docker.from_env()
        self.profiles = profiles
        self.credentials: Credentials = credentials or {}
        self.sealing_key = sealing_key
        self.device_id = device_id
        if name_prefix is None:
            name_prefix = f"{lb.DEFAULT_NAME_PREFIX}{device_id}-" if device_id else lb.DEFAULT_NAME_PREFIX
        self.name_prefix = name_prefix
        self.stop_timeout_s = stop_timeout_s
        self.host_root = host_root
        self.log_config = LogConfig(
            type=LogConfig.types.JSON, config={"max-size": log_max_size, "max-file": str(log_max_files)}
        )
        self.init = init
        self.puller = puller
        self.pulls = pulls or PullTracker()
        self.images = images
        self.gc_grace = gc_grace
        self._ports: dict[str, dict[str, Any]] = {}

    def container_name(self, module: str) -> str:
        """The container name of ``module``."""
        return f"{self.name_prefix}{module}"

    # --- observing -----------------------------------------------------------------------------

    async def observe(self, images: Collection[str] = ()) -> Observation:
        """This agent's containers and the availability of ``images`` (and of every image pulled)."""
        wanted = set(images) | self.pulls.requested
        modules, ports, present = await asyncio.to_thread(self._observe_blocking, wanted)
        self._ports = ports
        return modules, self.pulls.availability(present)

    def _observe_blocking(
        self, wanted: set[str]
    ) -> tuple[dict[str, ObservedModule], dict[str, dict[str, Any]], set[str]]:
        api = self.client.api
        local: set[str] = set()
        digests: dict[str, list[str]] = {}
        for image in api.images():
            repo_digests = image.get("RepoDigests") or []
            tags = image.get("RepoTags") or []
            local.update(tags, repo_digests)
            digests[image["Id"]] = [*repo_digests, *_loaded_digests(tags)]
        present = {ref for ref in wanted if lb.presence_keys(ref) & local}
        modules: dict[str, ObservedModule] = {}
        ports: dict[str, dict[str, Any]] = {}
        summaries = api.containers(all=True, filters={"label": lb.ownership_filters(self.device_id)})
        for summary in summaries:
            try:
                info = api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue
            labels = info["Config"].get("Labels") or {}
            if not lb.is_ours(labels, self.device_id):
                continue
            name = labels[lb.MODULE]
            modules[name] = self._observed(name, info, labels, digests)
            ports[name] = (info.get("NetworkSettings") or {}).get("Ports") or {}
        return modules, ports, present

    @staticmethod
    def _observed(
        name: str, info: dict[str, Any], labels: dict[str, str], digests: dict[str, list[str]]
    ) -> ObservedModule:
        state = info.get("State") or {}
        status = state.get("Status", "dead")
        status_value: ObservedStatus = status if status in _STATES else "dead"
        if status_value == "created" and state.get("Error"):
            status_value = "exited"  # a start that failed (bad entrypoint, device missing) is an exit
        image = labels.get(lb.IMAGE) or info["Config"].get("Image", "")
        image_id = info.get("Image")
        finished = parse_docker_time(state.get("FinishedAt"))
        exited = status_value in ("exited", "dead")
        return ObservedModule(
            name=name,
            image=image,
            status=status_value,
            config_hash=labels.get(lb.CONFIG_HASH),
            image_id=_repo_digest(image, digests.get(image_id or "", [])) or image_id,
            exit_code=int(state["ExitCode"]) if exited and state.get("ExitCode") is not None else None,
            started_at=parse_docker_time(state.get("StartedAt")),
            finished_at=finished if exited else None,
            instance=labels.get(lb.INSTANCE) if status_value == "running" else None,
        )

    def health_url(self, module: str, check: HealthCheck) -> str | None:
        """Where ``check.port`` of the module's container is published on the host, as of the last observe."""
        bindings = self._ports.get(module, {}).get(f"{check.port}/tcp") or []
        for binding in sorted(bindings, key=lambda b: ":" in (b.get("HostIp") or "")):
            host, port = binding.get("HostIp") or "", binding.get("HostPort")
            if not port:
                continue
            if host in _ANY_ADDRESS:
                host = "127.0.0.1"
            if ":" in host:
                host = f"[{host}]"
            return f"http://{host}:{port}"
        return None

    # --- pulling -------------------------------------------------------------------------------

    async def pull(self, action: Pull) -> None:
        """Start pulling ``action.image`` in the background (skipped when it is already local)."""
        try:
            auth = pull_auth(action.credentials, self.device_id or "", self.credentials, self.sealing_key)
        except CredentialError as e:
            problem = str(e)

            async def fail() -> None:
                raise RuntimeError(problem)

            self.pulls.start(action.image, fail)
            return
        if self.puller is not None:
            self.pulls.start(action.image, lambda: self._pull_resumable(action.image, auth))
            return
        engine_auth = {"username": auth[0], "password": auth[1]} if auth else None
        self.pulls.start(
            action.image, lambda: asyncio.to_thread(self._pull_blocking, action.image, engine_auth)
        )

    async def _pull_resumable(self, image: str, auth: tuple[str, str] | None) -> None:
        assert self.puller is not None
        if await asyncio.to_thread(self._image_present, image):
            log.info("pull of %s skipped: the image is already here", image)
            return
        pulled = await self.puller.pull(
            image, auth, progress=lambda p: self.pulls.report(image, p), present_layers=self._present_layers
        )
        await asyncio.to_thread(self._load_blocking, pulled)

    def _present_layers(self, diff_ids: list[str]) -> int:
        """How many leading layers of ``diff_ids`` Docker Engine has (the longest prefix of an
        image's layers): a model-only update after an engine pull fetches only the new layers."""
        best = 0
        for summary in self.client.api.images():
            try:
                layers = (self.client.api.inspect_image(summary["Id"]).get("RootFS") or {}).get(
                    "Layers"
                ) or []
            except docker.errors.NotFound:
                continue
            common = 0
            for mine, theirs in zip(diff_ids, layers, strict=False):
                if mine != theirs:
                    break
                common += 1
            best = max(best, common)
            if best == len(diff_ids):
                break
        return best

    def _load_blocking(self, pulled: PulledImage) -> None:
        """``docker load`` the pulled image from the blob store, tagged ``labels.loaded_tag``."""
        assert self.puller is not None
        image = pulled.reference
        tag = lb.loaded_tag(image)
        try:
            for event in self.client.api.load_image(docker_archive(self.puller.store, pulled, tag)):
                if isinstance(event, dict) and event.get("error"):
                    raise RuntimeError(f"docker load refused {image}: {event['error']}")
        except RuntimeError:
            raise
        except Exception as exc:
            raise RuntimeError(f"docker load of {image} failed: {_error_text(exc)}") from None
        if not self._image_present(image):
            raise RuntimeError(f"docker load finished but {tag} is not in Docker Engine")
        log.info("loaded %s into Docker Engine as %s (%d layers)", image, tag, len(pulled.layers))
        if self.images is not None:
            self.images.add(image, pulled.digests)

    def _pull_blocking(self, image: str, auth: dict[str, str] | None) -> None:
        if self._image_present(image):
            log.info("pull of %s skipped: the image is already here", image)
            return
        repository, tag = lb.pull_reference(image)
        try:
            for event in self.client.api.pull(
                repository, tag=tag, auth_config=auth, stream=True, decode=True
            ):
                if isinstance(event, dict) and event.get("error"):
                    raise RuntimeError(str(event["error"]))
        except RuntimeError:
            raise
        except Exception as exc:  # APIError (registry down, not found, denied), connection errors
            raise RuntimeError(_error_text(exc)) from None
        if not self._image_present(image):
            raise RuntimeError("the pull finished but the image is not in Docker Engine")
        if self.images is not None:
            self.images.add(image)

    def _image_present(self, image: str) -> bool:
        keys = lb.presence_keys(image)
        for found in self.client.api.images():
            if keys & {*(found.get("RepoTags") or []), *(found.get("RepoDigests") or [])}:
                return True
        return False

    # --- image garbage collection --------------------------------------------------------------

    async def collect_images(self, keep: Collection[str], now: datetime) -> list[str]:
        """Remove the images this agent pulled that neither ``keep`` nor any of its containers
        needed for ``gc_grace``, then the blobs no remaining image uses; the references removed.
        Nothing is collected while a download runs (its blobs are not in the book yet)."""
        if self.images is None or self.pulls.pulling:
            return []
        return await asyncio.to_thread(self._collect_blocking, set(keep), now)

    def _collect_blocking(self, keep: set[str], now: datetime) -> list[str]:
        assert self.images is not None
        for summary in self.client.api.containers(
            all=True, filters={"label": lb.ownership_filters(self.device_id)}
        ):
            image = (summary.get("Labels") or {}).get(lb.IMAGE)
            if image:
                keep.add(image)  # a module that still exists keeps its image (a held old version)
        removed: list[str] = []

        def change(before: dict[str, PulledRecord]) -> dict[str, PulledRecord]:
            decision = collect(before, keep, now, self.gc_grace)
            book = dict(decision.book)
            for ref in decision.remove:
                if self._remove_image(ref):
                    removed.append(ref)
                else:
                    book[ref] = before[ref]  # still in use (another container): tried again next time
            if self.puller is not None:
                blobs = unreferenced_blobs(self.puller.store.digests(), book)
                freed = self.puller.store.remove(blobs)
                if blobs:
                    log.info("removed %d blobs nothing uses any more (%d bytes)", len(blobs), freed)
                sweep_partials(self.puller.store, now, self.gc_grace)
            return book

        self.images.update(change)
        return removed

    def _remove_image(self, ref: str) -> bool:
        """Untag ``ref`` in Docker Engine (the image goes with its last tag); False when still in use."""
        names = {lb.local_reference(ref), lb.loaded_tag(ref)}
        gone = True
        for name in sorted(names):
            try:
                self.client.api.remove_image(name)
                log.info("removed image %s: neither desired nor last known good", name)
            except docker.errors.ImageNotFound:
                continue
            except docker.errors.APIError as exc:
                log.warning("image %s is kept: %s", name, _error_text(exc))
                gone = False
        return gone

    # --- lifecycle -----------------------------------------------------------------------------

    def _container(self, module: str) -> Any:
        """The module's container, only when it carries this agent's labels."""
        name = self.container_name(module)
        try:
            container = self.client.containers.get(name)
        except docker.errors.NotFound:
            raise RuntimeActionError(module, f"no container {name}") from None
        labels = container.labels or {}
        if not lb.is_ours(labels, self.device_id) or labels.get(lb.MODULE) != module:
            raise RuntimeActionError(
                module,
                f"container {name} is not managed by this agent (no {lb.MANAGED} label); left alone",
            )
        return container

    async def create(self, action: Create) -> None:
        """Create the module's container (not started) from its spec and profile."""
        await asyncio.to_thread(
            self._create_blocking, action.module, action.spec, action.config_hash, action.generation
        )

    def _create_options(
        self, module: str, spec: DesiredModule, config_hash: str, generation: int | None = None
    ) -> dict[str, Any]:
        profile = self.profiles.get(spec.profile)
        if profile is None:
            raise RuntimeActionError(
                module,
                f"device profile {spec.profile!r} is unknown (known: {', '.join(sorted(self.profiles))})",
            )
        try:
            access = docker_access(profile.container, self.host_root)
        except AccessError as exc:
            raise RuntimeActionError(module, f"profile {profile.name}: {exc}") from None
        labels = {
            lb.MANAGED: "true",
            lb.MODULE: module,
            lb.CONFIG_HASH: config_hash,
            lb.IMAGE: spec.image,
            lb.PROFILE: spec.profile,
            lb.INSTANCE: uuid.uuid4().hex,
        }
        if spec.version is not None:
            labels[lb.VERSION] = spec.version
        if generation is not None:
            labels[lb.GENERATION] = str(generation)
        if self.device_id is not None:
            labels[lb.DEVICE] = self.device_id
        ports: dict[str, list[tuple[str, int | None]]] = {}
        for p in spec.ports:
            ports.setdefault(f"{p.container}/{p.protocol}", []).append((p.host_ip, p.host))
        options: dict[str, Any] = {
            "name": self.container_name(module),
            "labels": labels,
            # The module echoes it to health probes: an answer from another server is not this one's.
            "environment": spec.container_env() | {INSTANCE_ENV: labels[lb.INSTANCE]},
            "ports": ports,
            "restart_policy": {"Name": "no"},
            "log_config": self.log_config,
            "detach": True,
            "init": self.init,
            **access.create_kwargs(),
        }
        if spec.resources.cpus is not None:
            options["nano_cpus"] = int(spec.resources.cpus * 1e9)
        if spec.resources.memory_mb is not None:
            options["mem_limit"] = f"{spec.resources.memory_mb}m"
        return options

    def _create_blocking(
        self, module: str, spec: DesiredModule, config_hash: str, generation: int | None
    ) -> None:
        options = self._create_options(module, spec, config_hash, generation)
        try:
            try:
                self.client.containers.create(lb.local_reference(spec.image), **options)
            except docker.errors.ImageNotFound:
                if lb.loaded_tag(spec.image) == lb.local_reference(spec.image):
                    raise
                self.client.containers.create(lb.loaded_tag(spec.image), **options)  # loaded by the agent
        except docker.errors.ImageNotFound:
            raise RuntimeActionError(module, f"image {spec.image} is not present (pull it first)") from None
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise RuntimeActionError(
                    module, f"a container named {options['name']} already exists: {_error_text(exc)}"
                ) from None
            raise RuntimeActionError(module, f"create failed: {_error_text(exc)}") from None

    async def start(self, action: Start) -> None:
        """Start the module's container."""
        await asyncio.to_thread(self._call, action.module, "start")

    async def stop(self, action: Stop) -> None:
        """Stop the module's container (SIGTERM, SIGKILL after ``stop_timeout_s``)."""
        await asyncio.to_thread(self._call, action.module, "stop", timeout=self.stop_timeout_s)

    async def restart(self, action: Restart) -> None:
        """Restart the module's container in place."""
        await asyncio.to_thread(self._call, action.module, "restart", timeout=self.stop_timeout_s)

    async def remove(self, action: Remove) -> None:
        """Remove the module's container (killing it if it still runs) and its anonymous volumes."""
        await asyncio.to_thread(self._call, action.module, "remove", v=True, force=True)

    def _call(self, module: str, method: str, **kwargs: Any) -> None:
        container = self._container(module)
        try:
            getattr(container, method)(**kwargs)
        except docker.errors.NotFound:
            raise RuntimeActionError(module, f"container {container.name} vanished during {method}") from None
        except docker.errors.APIError as exc:
            raise RuntimeActionError(module, f"{method} failed: {_error_text(exc)}") from None

    async def logs(self, module: str, tail: int = 100) -> str:
        """The last ``tail`` lines of the container's stdout and stderr."""

        def read() -> str:
            raw = self._container(module).logs(stdout=True, stderr=True, tail=tail)
            return bytes(raw).decode("utf-8", errors="replace")

        return await asyncio.to_thread(read)

    async def close(self) -> None:
        """Cancel pulls in flight and close the SDK client; containers keep running."""
        await self.pulls.close()
        await asyncio.to_thread(self.client.close)
