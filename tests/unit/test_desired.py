"""Desired states: generation moves only when content changes; payloads verify and validate."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest

from cloud.fleet.desired import EMPTY, DesiredContent, Renderer, content_from_payload, next_generation
from modules.contract import (
    DesiredModule,
    DesiredState,
    HealthCheck,
    PortMapping,
    Resources,
    canonical_json,
)
from modules.signing import SignatureError, generate_keypair, load_private_key, verify_desired

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
KEY = load_private_key(generate_keypair()[0])
WEB = DesiredModule(image="reg.local/web:1", env={"A": "1"}, ports=[PortMapping(container=5001, host=8080)])


def content(**changes: object) -> DesiredContent:
    base: dict[str, object] = {"deployment": "d", "modules": {"web": WEB}}
    base.update(changes)
    return DesiredContent(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("previous", "new", "expected"),
    [
        (None, content(), 1),
        ((4, content().hash), content(), None),
        (
            (4, content().hash),
            content(modules={"web": WEB.model_copy(update={"image": "reg.local/web:2"})}),
            5,
        ),
        ((4, content().hash), content(rollback="none"), 5),
        ((4, content().hash), content(health_deadline_s=30.0), 5),
        ((4, content().hash), content(deployment="other"), 5),
        ((4, content().hash), EMPTY, 5),
    ],
)
def test_generation_bumps_only_on_changed_content(
    previous: tuple[int, str] | None, new: DesiredContent, expected: int | None
) -> None:
    assert next_generation(previous, new.hash) == expected


def test_hash_ignores_module_order() -> None:
    other = DesiredModule(image="reg.local/other:1")
    assert content(modules={"web": WEB, "x": other}).hash == content(modules={"x": other, "web": WEB}).hash


def test_content_round_trips_through_json() -> None:
    c = content()
    assert DesiredContent.from_json(c.to_json()).hash == c.hash


def test_payloads_share_a_template_yet_verify_per_device() -> None:
    renderer = Renderer(KEY, T0, ttl=timedelta(days=2))
    c = content()
    payloads = {d: renderer.payload(d, g, c, c.hash) for d, g in (("cam-1", 3), ("cam-2", 7))}
    public = KEY.public_key()
    for device, generation in (("cam-1", 3), ("cam-2", 7)):
        state = DesiredState.model_validate_json(payloads[device])
        verify_desired(state, public)
        assert (state.device_id, state.generation) == (device, generation)
        assert state.expires_at == T0 + timedelta(days=2)
        assert state.canonical_bytes() == renderer.state(device, generation, c).canonical_bytes()
        assert content_from_payload(payloads[device]).hash == c.hash
        assert payloads[device] == canonical_json({**state.signed_document(), "signature": state.signature})


def test_tampered_payload_fails_verification() -> None:
    renderer = Renderer(KEY, T0)
    c = content()
    state = DesiredState.model_validate_json(renderer.payload("cam-1", 1, c, c.hash))
    forged = state.model_copy(update={"device_id": "cam-9"})
    with pytest.raises(SignatureError, match="mismatch"):
        verify_desired(forged, KEY.public_key())


def test_naive_issue_time_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        Renderer(KEY, datetime(2026, 1, 1))


def test_the_agent_admits_what_the_cloud_renders() -> None:
    from agent.admission import admit

    c = content()
    payload = Renderer(KEY, T0).payload("cam-1", 5, c, c.hash)
    state = admit(payload, device_id="cam-1", last_generation=4, public_key=KEY.public_key(), now=T0)
    assert (state.generation, state.modules["web"].image) == (5, "reg.local/web:1")


@pytest.mark.parametrize(
    "text",
    [
        "cam-1",
        "grüße ✓ 日本",
        'quote " back \\ slash',
        "ctl \x00\x1f\x7f tab\t nl\n",
        "sep \u2028\u2029 emoji 🚀",
    ],
)
def test_orjson_escapes_a_string_as_canonical_json_does(text: str) -> None:
    """The renderer encodes the device id with orjson inside otherwise canonical_json bytes."""
    assert orjson.dumps(text) == canonical_json(text)


def test_tricky_content_renders_byte_for_byte_canonical_and_the_agent_admits_it() -> None:
    from agent.admission import admit

    issued = datetime(2026, 1, 1, 12, 30, 5, 123456, tzinfo=timezone.utc)
    module = DesiredModule(
        image="reg.local/web:1",
        env={"GREETING": "grüße ✓ 日本 \u2028", "QUOTE": 'say "hi"\\n', "EMPTY": ""},
        resources=Resources(cpus=0.1, memory_mb=64),
        health=HealthCheck(interval_s=1e-3, timeout_s=0.3),
    )
    c = DesiredContent("depl", {"web": module}, health_deadline_s=12.75)
    payload = Renderer(KEY, issued, ttl=timedelta(hours=1, microseconds=7)).payload("cam-1", 9, c, c.hash)
    state = admit(payload, device_id="cam-1", last_generation=8, public_key=KEY.public_key(), now=issued)
    assert payload == canonical_json({**state.signed_document(), "signature": state.signature})
    assert state.modules["web"].env["GREETING"] == "grüße ✓ 日本 \u2028"
    assert state.modules["web"].health.interval_s == 1e-3
    assert state.expires_at == issued + timedelta(hours=1, microseconds=7)
