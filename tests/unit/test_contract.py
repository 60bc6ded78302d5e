"""modules/contract.py, table by table: what is accepted, what is rejected, and the field each error names."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from modules.contract import (
    CommandRequest,
    DeploymentManifest,
    DesiredState,
    Target,
    canonical_json,
    format_validation_error,
    split_image_ref,
)
from modules.documents import DocumentError, load_model

DIGEST = "sha256:" + "0123456789abcdef" * 4


def manifest(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "shop",
        "target": {"profile": "cpu"},
        "modules": {"web": {"images": {"cpu": "localhost:5000/shop/web:1.0"}}},
    }
    doc.update(copy.deepcopy(changes))
    return doc


def web(**fields: Any) -> dict[str, Any]:
    """A manifest whose only module ``web`` has these extra fields."""
    return manifest(modules={"web": {"images": {"cpu": "localhost:5000/shop/web:1.0"}, **fields}})


def problems(model: type[BaseModel], data: Any) -> list[str]:
    """The lines format_validation_error gives for ``data`` (empty when it validates)."""
    try:
        model.model_validate(data)
    except ValidationError as err:
        return format_validation_error(err).splitlines()
    return []


def assert_rejected(model: type[BaseModel], data: Any, field: str, message: str) -> None:
    lines = problems(model, data)
    assert any(line.startswith(f"{field}: ") and message in line for line in lines), lines


# --------------------------------------------------------------------------------------------
# Ports, restart policy, env
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "field", "message"),
    [
        ({"container": 0}, "modules.web.ports.0.container", "greater than or equal to 1"),
        ({"container": -80}, "modules.web.ports.0.container", "greater than or equal to 1"),
        ({"container": 65536}, "modules.web.ports.0.container", "less than or equal to 65535"),
        ({"container": 80, "host": 0}, "modules.web.ports.0.host", "greater than or equal to 1"),
        ({"container": 80, "host": 70000}, "modules.web.ports.0.host", "less than or equal to 65535"),
        ({"container": "http"}, "modules.web.ports.0.container", "valid integer"),
        ({"container": 80, "protocol": "sctp"}, "modules.web.ports.0.protocol", "'tcp' or 'udp'"),
        ({"host": 8080}, "modules.web.ports.0.container", "Field required"),
    ],
)
def test_bad_ports(port: dict[str, Any], field: str, message: str) -> None:
    assert_rejected(DeploymentManifest, web(ports=[port]), field, message)


@pytest.mark.parametrize(
    "port", [{"container": 1}, {"container": 65535, "host": 65535}, {"container": 80, "host": 8080}]
)
def test_good_ports(port: dict[str, Any]) -> None:
    assert problems(DeploymentManifest, web(ports=[port])) == []


def test_published_ports_bind_to_loopback_by_default() -> None:
    m = DeploymentManifest.model_validate(web(ports=[{"container": 5001, "host": 8080}]))
    assert m.modules["web"].ports[0].host_ip == "127.0.0.1"


@pytest.mark.parametrize("policy", ["sometimes", "Always", "", "unless-stopped"])
def test_unknown_restart_policy(policy: str) -> None:
    assert_rejected(
        DeploymentManifest,
        web(restart_policy=policy),
        "modules.web.restart_policy",
        "Input should be 'always'",
    )


@pytest.mark.parametrize("policy", ["always", "on-failure", "on-unhealthy", "never"])
def test_known_restart_policies(policy: str) -> None:
    assert problems(DeploymentManifest, web(restart_policy=policy)) == []


@pytest.mark.parametrize("name", ["1BAD", "BAD-NAME", "A B", "", "É"])
def test_invalid_env_names(name: str) -> None:
    assert_rejected(
        DeploymentManifest,
        web(env={name: "x"}),
        "modules.web.env",
        f"{name!r} is not a valid environment variable name",
    )


@pytest.mark.parametrize("name", ["_X", "MODEL_DIR", "a1", "AZUREML_MODEL_DIR"])
def test_valid_env_names(name: str) -> None:
    assert problems(DeploymentManifest, web(env={name: "x"})) == []


def test_env_values_must_be_strings() -> None:
    assert_rejected(DeploymentManifest, web(env={"WORKERS": 4}), "modules.web.env.WORKERS", "valid string")


# --------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------


def test_modules_as_a_list_with_unique_names() -> None:
    m = DeploymentManifest.model_validate(
        manifest(
            modules=[{"name": "web", "images": {"cpu": "web:1"}}, {"name": "db", "images": {"cpu": "db:1"}}]
        )
    )
    assert list(m.modules) == ["web", "db"]


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (
            [{"name": "web", "images": {"cpu": "a:1"}}, {"name": "web", "images": {"cpu": "b:1"}}],
            "duplicate module name 'web'",
        ),
        ([{"images": {"cpu": "a:1"}}], "item 0 needs a 'name'"),
        ({}, "at least 1 item"),
    ],
)
def test_bad_module_lists(modules: Any, message: str) -> None:
    assert_rejected(DeploymentManifest, manifest(modules=modules), "modules", message)


def test_bad_module_name() -> None:
    assert_rejected(
        DeploymentManifest,
        manifest(modules={"Web": {"images": {"cpu": "web:1"}}}),
        "modules.Web.[key]",
        "is not a valid name",
    )


def test_duplicate_module_key_in_yaml_is_rejected_by_the_loader() -> None:
    text = (
        "name: shop\ntarget: {profile: cpu}\nmodules:\n"
        "  web:\n    images: {cpu: 'web:1'}\n"
        "  web:\n    images: {cpu: 'web:2'}\n"
    )
    with pytest.raises(
        DocumentError, match=r"^deploy\.yaml:6: duplicate key 'web' in mapping \(first on line 4\)$"
    ):
        load_model(DeploymentManifest, text, "deploy.yaml")


def test_duplicate_module_key_in_json_is_rejected_by_the_loader() -> None:
    text = (
        '{"name": "shop", "target": {"profile": "cpu"},\n'
        ' "modules": {"web": {"images": {"cpu": "a:1"}},\n "web": {}}}'
    )
    with pytest.raises(DocumentError, match=r"^deploy\.json:3: duplicate key 'web'"):
        load_model(DeploymentManifest, text, "deploy.json")


# --------------------------------------------------------------------------------------------
# Image references
# --------------------------------------------------------------------------------------------

GOOD_IMAGES = [
    "web",
    "web:1.0",
    "shop/web:latest",
    "localhost:5000/shop/web:1.0",
    "127.0.0.1:5000/edgedeploy/base-cpu:bookworm-py311",
    "[::1]:5000/web:1",
    f"registry.example.com/team/web@{DIGEST}",
    f"localhost:5000/shop/web:1.0@{DIGEST}",
    "Registry.Example.com/web:TAG_1",
    "a__b/c-d.e/f---g:v1.2.3",
]

BAD_IMAGES = [
    "Web:1",
    "localhost:5000/Shop/web:1",
    "my web:1",
    "web: 1",
    " web",
    "web@sha256:abc",
    "web@sha256:" + "A" * 64,
    "web@sha256:" + "0" * 63,
    "web@md5:" + "0" * 32,
    "web:",
    ":1",
    "web:" + "a" * 129,
    "",
    "-web",
    "http://registry/web",
    "web/",
    "web:-tag",
]


@pytest.mark.parametrize("ref", GOOD_IMAGES)
def test_good_image_refs(ref: str) -> None:
    assert problems(DeploymentManifest, web(images={"cpu": ref})) == []


@pytest.mark.parametrize("ref", BAD_IMAGES)
def test_bad_image_refs(ref: str) -> None:
    assert_rejected(
        DeploymentManifest,
        web(images={"cpu": ref}),
        "modules.web.images.cpu",
        "is not a valid image reference",
    )


def test_images_need_a_profile_name_and_at_least_one_entry() -> None:
    assert_rejected(
        DeploymentManifest, web(images={"CUDA": "web:1"}), "modules.web.images.CUDA.[key]", "not a valid name"
    )
    assert_rejected(DeploymentManifest, web(images={}), "modules.web.images", "at least 1 item")


@pytest.mark.parametrize(
    ("ref", "repository", "tag", "digest"),
    [
        ("web", "web", None, None),
        ("localhost:5000/shop/web:1.0", "localhost:5000/shop/web", "1.0", None),
        (f"localhost:5000/shop/web@{DIGEST}", "localhost:5000/shop/web", None, DIGEST),
        (f"localhost:5000/shop/web:1.0@{DIGEST}", "localhost:5000/shop/web", "1.0", DIGEST),
    ],
)
def test_split_image_ref(ref: str, repository: str, tag: str | None, digest: str | None) -> None:
    parts = split_image_ref(ref)
    assert (parts.repository, parts.tag, parts.digest) == (repository, tag, digest)
    assert parts.pinned is (digest is not None)


def test_split_image_ref_rejects_bad_refs() -> None:
    with pytest.raises(ValueError, match="not a valid image reference"):
        split_image_ref("Web:1")


# --------------------------------------------------------------------------------------------
# Targets, host ports across modules, rollout waves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [{}, {"device_ids": [], "tags": {}}, {"profile": None}])
def test_empty_target(target: dict[str, Any]) -> None:
    assert_rejected(DeploymentManifest, manifest(target=target), "target", "target selects nothing")


@pytest.mark.parametrize("target", [{"device_ids": ["dev-1"]}, {"tags": {"site": "a"}}, {"profile": "cuda"}])
def test_targets_that_select(target: dict[str, Any]) -> None:
    assert problems(DeploymentManifest, manifest(target=target)) == []


def test_bad_device_id_in_target() -> None:
    assert_rejected(
        DeploymentManifest,
        manifest(target={"device_ids": ["Dev 1"]}),
        "target.device_ids.0",
        "not a valid name",
    )


def test_duplicate_host_ports_across_modules() -> None:
    data = manifest(
        modules={
            "a": {"images": {"cpu": "a:1"}, "ports": [{"container": 80, "host": 8080}]},
            "b": {"images": {"cpu": "b:1"}, "ports": [{"container": 81, "host": 8080}]},
        }
    )
    lines = problems(DeploymentManifest, data)
    assert any("modules 'a' and 'b' both publish host port 8080" in line for line in lines), lines


def test_duplicate_host_ports_in_one_module() -> None:
    ports = [{"container": 80, "host": 8080}, {"container": 81, "host": 8080}]
    assert_rejected(
        DeploymentManifest, web(ports=ports), "modules.web.ports", "host port 8080/tcp is published twice"
    )


@pytest.mark.parametrize(
    "modules",
    [
        {
            "a": {"images": {"cpu": "a:1"}, "ports": [{"container": 53, "host": 5353, "protocol": "udp"}]},
            "b": {"images": {"cpu": "b:1"}, "ports": [{"container": 53, "host": 5353, "protocol": "tcp"}]},
        },
        {
            "a": {"images": {"cpu": "a:1"}, "ports": [{"container": 5001}]},
            "b": {"images": {"cpu": "b:1"}, "ports": [{"container": 5001}]},
        },
    ],
    ids=["same-port-other-protocol", "unpublished-container-ports"],
)
def test_host_ports_that_do_not_clash(modules: dict[str, Any]) -> None:
    assert problems(DeploymentManifest, manifest(modules=modules)) == []


@pytest.mark.parametrize(
    "waves", [[1], [5, "100%"], ["10%", "50%", "100%"], ["12.5%"], ["0.5%"], ["100%"], ["10"]]
)
def test_good_wave_sizes(waves: list[Any]) -> None:
    assert problems(DeploymentManifest, manifest(rollout={"waves": waves})) == []


@pytest.mark.parametrize(
    ("waves", "field", "message"),
    [
        ([0], "rollout.waves.0", "0 must be a device count (≥ 1)"),
        ([-3], "rollout.waves.0", "-3 must be a device count (≥ 1)"),
        ([True], "rollout.waves.0", "True must be a device count"),
        (["100.5%"], "rollout.waves.0", "'100.5%' must be a device count (≥ 1) or a percentage"),
        (["150%"], "rollout.waves.0", ""),
        (["0%"], "rollout.waves.0", ""),
        (["ten"], "rollout.waves.0", ""),
        ([], "rollout.waves", "at least 1 item"),
    ],
)
def test_bad_wave_sizes(waves: list[Any], field: str, message: str) -> None:
    lines = problems(DeploymentManifest, manifest(rollout={"waves": waves}))
    assert lines and all(line.startswith(field) for line in lines), lines
    assert any(message in line for line in lines), lines


@pytest.mark.parametrize(
    ("rollout", "field"),
    [
        ({"max_failure_ratio": 1.5}, "rollout.max_failure_ratio"),
        ({"max_failure_ratio": -0.1}, "rollout.max_failure_ratio"),
    ],
)
def test_failure_ratio_bounds(rollout: dict[str, Any], field: str) -> None:
    assert_rejected(DeploymentManifest, manifest(rollout=rollout), field, "Input should be")


def test_unknown_fields_are_rejected_with_their_path() -> None:
    assert_rejected(
        DeploymentManifest, web(restart="always"), "modules.web.restart", "Extra inputs are not permitted"
    )
    assert_rejected(
        DeploymentManifest, manifest(rollback="sometimes"), "rollback", "Input should be 'auto' or 'none'"
    )


@pytest.mark.parametrize(
    ("target", "device", "tags", "profile", "expected"),
    [
        ({"device_ids": ["d1", "d2"]}, "d1", {}, "cpu", True),
        ({"device_ids": ["d1", "d2"]}, "d3", {}, "cpu", False),
        ({"tags": {"site": "a"}}, "d9", {"site": "a", "floor": "2"}, "cuda", True),
        ({"tags": {"site": "a"}}, "d9", {"site": "b"}, "cpu", False),
        ({"tags": {"site": "a", "floor": "2"}}, "d9", {"site": "a"}, "cpu", False),
        ({"profile": "cuda"}, "d1", {}, "cuda", True),
        ({"profile": "cuda"}, "d1", {}, "cpu", False),
        ({"device_ids": ["d1"], "profile": "cuda"}, "d1", {}, "cpu", False),
        ({"device_ids": ["d1"], "tags": {"site": "a"}, "profile": "cpu"}, "d1", {"site": "a"}, "cpu", True),
    ],
)
def test_target_matches(
    target: dict[str, Any], device: str, tags: dict[str, str], profile: str, expected: bool
) -> None:
    assert Target.model_validate(target).matches(device, tags, profile) is expected


# --------------------------------------------------------------------------------------------
# Desired state
# --------------------------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def desired(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "device_id": "dev-1",
        "generation": 3,
        "issued_at": T0.isoformat(),
        "expires_at": (T0 + timedelta(days=1)).isoformat(),
        "modules": {
            "web": {"image": f"localhost:5000/shop/web@{DIGEST}", "env": {"B": "2", "A": "1"}},
            "db": {"image": "localhost:5000/shop/db:1", "ports": [{"container": 5432}]},
        },
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    "expires_at",
    [T0.isoformat(), (T0 - timedelta(seconds=1)).isoformat(), "2026-01-01T01:00:00+02:00"],
    ids=["equal", "before", "earlier-in-other-zone"],
)
def test_expiry_must_follow_issue(expires_at: str) -> None:
    lines = problems(DesiredState, desired(expires_at=expires_at))
    assert any(line.startswith("expires_at: must be after issued_at") for line in lines), lines


@pytest.mark.parametrize("field", ["issued_at", "expires_at"])
def test_naive_timestamps_are_rejected(field: str) -> None:
    assert_rejected(
        DesiredState, desired(**{field: "2026-01-01T12:00:00"}), field, "timestamp needs a timezone"
    )


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"generation": 0}, "generation", "greater than or equal to 1"),
        ({"device_id": "Dev 1"}, "device_id", "not a valid name"),
        ({"modules": {"web": {"image": "Web"}}}, "modules.web.image", "not a valid image reference"),
        ({"modules": {"web": {}}}, "modules.web.image", "Field required"),
        (
            {"registry_credentials": [{"registry": "localhost:5000", "secret": ""}]},
            "registry_credentials.0.secret",
            "at least 1 character",
        ),
    ],
)
def test_bad_desired_state(changes: dict[str, Any], field: str, message: str) -> None:
    assert_rejected(DesiredState, desired(**changes), field, message)


def test_canonical_bytes_are_sorted_compact_and_exclude_the_signature() -> None:
    state = DesiredState.model_validate(desired())
    data = state.canonical_bytes()
    assert data == canonical_json(json.loads(data))
    assert b" " not in data
    parsed = json.loads(data)
    assert "signature" not in parsed
    assert list(parsed) == sorted(parsed)
    assert list(parsed["modules"]["web"]["env"]) == ["A", "B"]
    signed = state.model_copy(update={"signature": "c2lnbmF0dXJl"})
    assert signed.canonical_bytes() == data


def test_canonical_bytes_survive_a_json_round_trip_and_reordering() -> None:
    state = DesiredState.model_validate(desired())
    reordered = dict(reversed(list(desired().items())))
    reordered["modules"] = dict(reversed(list(reordered["modules"].items())))
    again = DesiredState.model_validate(reordered)
    wire = DesiredState.model_validate_json(state.model_dump_json())
    zulu = DesiredState.model_validate(desired(issued_at="2026-01-01T00:00:00Z"))
    as_list = DesiredState.model_validate(
        desired(modules=[{"name": k, **v} for k, v in desired()["modules"].items()])
    )
    assert again.canonical_bytes() == state.canonical_bytes()
    assert wire.canonical_bytes() == state.canonical_bytes()
    assert zulu.canonical_bytes() == state.canonical_bytes()
    assert as_list.canonical_bytes() == state.canonical_bytes()


@pytest.mark.parametrize(
    "changes",
    [
        {"generation": 4},
        {"device_id": "dev-2"},
        {"expires_at": (T0 + timedelta(days=2)).isoformat()},
        {"rollback": "none"},
    ],
)
def test_canonical_bytes_change_with_the_content(changes: dict[str, Any]) -> None:
    base = DesiredState.model_validate(desired()).canonical_bytes()
    assert DesiredState.model_validate(desired(**changes)).canonical_bytes() != base


def test_unset_batching_is_not_part_of_the_signed_bytes() -> None:
    """A state signed before modules had ``batching`` verifies on an agent that knows the field."""
    state = DesiredState.model_validate(desired())
    assert b"batching" not in state.canonical_bytes()
    tuned = desired()
    tuned["modules"]["web"]["batching"] = {"max_batch_size": 8}
    signed_bytes = DesiredState.model_validate(tuned).canonical_bytes()
    assert b'"batching":{"max_batch_delay_ms":0.0,"max_batch_size":8}' in signed_bytes


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_batching_becomes_the_module_s_environment() -> None:
    spec = DeploymentManifest.model_validate(
        web(env={"LOG_LEVEL": "DEBUG"}, batching={"max_batch_size": 8, "max_batch_delay_ms": 2})
    ).modules["web"]
    assert spec.container_env() == {
        "LOG_LEVEL": "DEBUG",
        "SCORING_MAX_BATCH_SIZE": "8",
        "SCORING_MAX_BATCH_DELAY_MS": "2",
    }
    plain = DeploymentManifest.model_validate(web(env={"A": "1"})).modules["web"]
    assert plain.container_env() == {"A": "1"}


@pytest.mark.parametrize(
    ("batching", "field", "message"),
    [
        ({"max_batch_size": 0}, "modules.web.batching.max_batch_size", "greater than or equal to 1"),
        ({"max_batch_delay_ms": -1}, "modules.web.batching.max_batch_delay_ms", "greater than or equal to 0"),
        (
            {"max_batch_delay_ms": 5000},
            "modules.web.batching.max_batch_delay_ms",
            "less than or equal to 1000",
        ),
        ({"size": 8}, "modules.web.batching.size", "Extra inputs are not permitted"),
    ],
)
def test_bad_batching(batching: dict[str, Any], field: str, message: str) -> None:
    assert_rejected(DeploymentManifest, web(batching=batching), field, message)


def test_batching_and_its_env_variables_are_not_both_set() -> None:
    lines = problems(DeploymentManifest, web(batching={}, env={"SCORING_MAX_BATCH_SIZE": "4"}))
    assert any("set 'batching' or env SCORING_MAX_BATCH_SIZE, not both" in line for line in lines), lines


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["logs", "restart"])
def test_module_commands_need_a_module(command: str) -> None:
    lines = problems(CommandRequest, {"id": "c1", "command": command})
    assert any(f"command {command!r} needs a module" in line for line in lines), lines
    assert problems(CommandRequest, {"id": "c1", "command": command, "module": "web"}) == []


def test_ping_needs_no_module() -> None:
    assert problems(CommandRequest, {"id": "c1", "command": "ping"}) == []


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"id": "c/1", "command": "ping"}, "id", "String should match pattern"),
        ({"id": "", "command": "ping"}, "id", "at least 1 character"),
        ({"id": "x" * 65, "command": "ping"}, "id", "at most 64 characters"),
        ({"id": "c1", "command": "reboot"}, "command", "Input should be 'logs', 'restart' or 'ping'"),
        ({"id": "c1", "command": "logs", "module": "web", "tail": 0}, "tail", "greater than or equal to 1"),
    ],
)
def test_bad_commands(data: dict[str, Any], field: str, message: str) -> None:
    assert_rejected(CommandRequest, data, field, message)


def test_format_validation_error_prefixes_the_source() -> None:
    with pytest.raises(ValidationError) as exc:
        DeploymentManifest.model_validate(web(ports=[{"container": 0}], restart_policy="x"))
    lines = format_validation_error(exc.value, "deploy.yaml").splitlines()
    assert len(lines) == 2
    assert all(line.startswith("deploy.yaml: modules.web.") for line in lines)
    assert not any("Value error, " in line for line in format_validation_error(exc.value).splitlines())
