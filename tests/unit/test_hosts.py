"""Which hosts are this machine (plain HTTP to a registry, the API's bind warning)."""

from __future__ import annotations

import pytest

from agent.runtime.registry_pull import _is_loopback as registry_on_this_machine
from modules.hosts import is_loopback


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("10.0.0.1", False),
        ("registry.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ("127.0.0.1:5000", True),
        ("localhost:5000", True),
        ("[::1]:5000", True),
        ("localhost", True),
        ("registry.example.com:443", False),
        ("10.1.2.3:5000", False),
    ],
)
def test_a_registry_with_a_port_is_judged_by_its_host(registry: str, expected: bool) -> None:
    assert registry_on_this_machine(registry) is expected
