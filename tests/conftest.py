"""Session fixtures that start the real services integration tests use, and the run summary.

Every fixture skips its tests loudly when its part cannot start; the end of the run prints one
line saying which real parts ran (``real services: mosquitto=ran registry=ran docker=...``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.services import (
    ManagedProcess,
    MosquittoBroker,
    MosquittoFactory,
    RegistryServer,
    connect_docker,
    ledger,
    start_or_skip,
)

S = TypeVar("S", bound=ManagedProcess)


def _started(service: S) -> S:
    service.start()
    return service


@pytest.fixture(scope="session")
def mosquitto(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    """A shared anonymous Mosquitto broker on 127.0.0.1 for the whole session. Do not restart it."""
    workdir = tmp_path_factory.mktemp("mosquitto")
    broker = start_or_skip(request.config, "mosquitto", lambda: _started(MosquittoBroker(workdir)))
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoFactory]:
    """Start brokers of the test's own: ``mosquitto_factory(conf_extra, password_file=, acl_file=)``.

    Each broker is started before it is returned, can be ``stop()``-ed, ``start()``-ed and
    ``restart()``-ed on the same port, and is stopped when the test ends.
    """
    brokers: list[MosquittoBroker] = []

    def make(
        conf_extra: str = "",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        **options: Any,
    ) -> MosquittoBroker:
        workdir = tmp_path_factory.mktemp("mosquitto")

        def start() -> MosquittoBroker:
            broker = MosquittoBroker(workdir, conf_extra, password_file, acl_file, **options)
            brokers.append(broker)
            return _started(broker)

        return start_or_skip(request.config, "mosquitto", start)

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture(scope="session")
def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """A CNCF distribution registry on 127.0.0.1 with storage in a temporary directory."""
    workdir = tmp_path_factory.mktemp("registry")
    server = start_or_skip(request.config, "registry", lambda: _started(RegistryServer(workdir)))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ``docker.DockerClient`` for the local Docker Engine; skips when the engine does not answer."""
    client = start_or_skip(request.config, "docker", connect_docker)
    yield client
    client.close()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print which real services ran, were skipped (with why) or were not used in this session."""
    terminalreporter.write_line(ledger(config).summary(), bold=True)
