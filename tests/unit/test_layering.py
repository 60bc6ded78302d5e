"""Layered deployments: layers add, replace and override modules on top of the base, by priority."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cloud.fleet.explain import explain
from cloud.fleet.targeting import DeploymentEntry, DeviceInfo, placements, resolve
from modules.contract import DeploymentManifest
from modules.profiles import fallback_chain, load_profiles
from tests.unit.test_contract import problems

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CHAINS = {name: fallback_chain(name, load_profiles()) for name in load_profiles()}
LAB = {"tags": {"site": "lab"}}
CAM = DeviceInfo("cam-1", "cpu", {"site": "lab"})
GPU = DeviceInfo("gpu-1", "cuda", {"site": "lab"})


def deployment(name: str, *, age: int = 0, **fields: Any) -> DeploymentEntry:
    doc = {"name": name, "target": LAB, **fields}
    return DeploymentEntry(DeploymentManifest.model_validate(doc), T0 - timedelta(minutes=age))


BASE = deployment(
    "base",
    age=10,
    modules={
        "web": {
            "images": {"cpu": "r/web:1"},
            "env": {"A": "1", "B": "2"},
            "ports": [{"container": 5001, "host": 8081}],
        },
        "db": {"images": {"cpu": "r/db:1"}},
    },
)


def test_a_layer_adds_replaces_and_overrides_and_keeps_the_rest_of_the_base() -> None:
    layer = deployment(
        "debug",
        layered=True,
        priority=5,
        modules={"db": {"images": {"cpu": "r/db:2"}}, "exporter": {"images": {"cpu": "r/exp:1"}}},
        overrides={"web": {"env": {"B": "debug", "C": "3"}, "restart_policy": "never"}},
    )
    got = resolve([CAM], [BASE, layer], CHAINS).assignments["cam-1"]
    assert got.deployment.name == "base"
    assert [e.name for e in got.layers] == ["debug"]
    web = got.modules["web"]
    assert (web.image, web.env, web.restart_policy) == (
        "r/web:1",
        {"A": "1", "B": "debug", "C": "3"},
        "never",
    )
    assert web.ports[0].host == 8081
    assert got.modules["db"].image == "r/db:2"
    assert got.modules["exporter"].image == "r/exp:1"
    assert got.provenance["web"].describe() == "from 'base' (env.B, env.C, restart_policy by 'debug')"
    assert got.provenance["db"].describe() == "from 'debug' (replaces 'base')"
    assert got.provenance["exporter"].describe() == "from 'debug'"


def test_without_layers_a_higher_priority_deployment_still_replaces_the_base_whole() -> None:
    other = deployment("other", priority=5, modules={"exporter": {"images": {"cpu": "r/exp:1"}}})
    got = resolve([CAM], [BASE, other], CHAINS).assignments["cam-1"]
    assert sorted(got.modules) == ["exporter"]
    assert got.deployment.name == "other"


def test_per_module_the_higher_priority_layer_wins_whatever_the_apply_order() -> None:
    low = deployment("low", layered=True, priority=1, overrides={"web": {"env": {"B": "low", "D": "low"}}})
    high = deployment("high", layered=True, priority=9, age=30, overrides={"web": {"env": {"B": "high"}}})
    got = resolve([CAM], [high, BASE, low], CHAINS).assignments["cam-1"]
    assert got.modules["web"].env == {"A": "1", "B": "high", "D": "low"}
    assert [e.name for e in got.layers] == ["low", "high"]


def test_equal_priority_layers_that_set_a_module_differently_conflict() -> None:
    a = deployment("a", layered=True, priority=3, overrides={"web": {"env": {"B": "a"}}})
    b = deployment("b", layered=True, priority=3, overrides={"web": {"env": {"B": "b"}}})
    same = deployment("c", layered=True, priority=3, overrides={"web": {"env": {"B": "a"}}})
    result = resolve([CAM], [BASE, a, b, same], CHAINS)
    assert sorted({(x, y) for _, x, y in result.conflicts}) == [("a", "b"), ("b", "c")]
    assert "'a' and 'b' have the same priority" in result.conflict_messages("a")[0]


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (
            {"overrides": {"cache": {"env": {"X": "1"}}}},
            "overrides module 'cache', which no deployment below",
        ),
        ({"modules": {"gpu": {"images": {"tensorrt": "r/trt:1"}}}}, "no image for profile 'cpu'"),
        (
            {"modules": {"side": {"images": {"cpu": "r/s:1"}, "ports": [{"container": 1, "host": 8081}]}}},
            "both publish host port 8081/tcp",
        ),
        (
            {
                "overrides": {
                    "web": {"batching": {"max_batch_size": 4}, "env": {"SCORING_MAX_BATCH_SIZE": "2"}}
                }
            },
            "not both",
        ),
    ],
)
def test_a_layer_that_cannot_apply_is_left_out_with_the_reason(layer: dict[str, Any], why: str) -> None:
    entry = deployment("bad", layered=True, priority=5, **layer)
    result = resolve([CAM], [BASE, entry], CHAINS)
    got = result.assignments["cam-1"]
    assert got.layers == ()
    assert sorted(got.modules) == ["db", "web"]
    assert why in got.layered.left_out["bad"]
    assert any(p.startswith("deployment 'bad': layer left out") and why in p for p in result.problems)


def test_a_layer_alone_gives_its_modules_and_names_the_state_after_itself() -> None:
    alone = deployment("alone", layered=True, modules={"exporter": {"images": {"cpu": "r/exp:1"}}})
    got = resolve([CAM], [alone], CHAINS).assignments["cam-1"]
    assert got.deployment.name == "alone" and sorted(got.modules) == ["exporter"]
    assert (
        "cam-1"
        not in resolve([CAM], [deployment("o", layered=True, overrides={"web": {}})], CHAINS).assignments
    )


def test_layer_images_follow_the_device_s_profile_chain() -> None:
    base = deployment("base", modules={"web": {"images": {"cpu": "r/web:1"}}})
    layer = deployment("l", layered=True, modules={"web": {"images": {"cpu": "r/web:2", "cuda": "r/web:cu"}}})
    result = resolve([CAM, GPU], [base, layer], CHAINS)
    assert result.assignments["cam-1"].modules["web"].image == "r/web:2"
    assert result.assignments["gpu-1"].modules["web"].profile == "cuda"


def test_placements_list_each_module_s_origin_and_devices() -> None:
    layer = deployment("debug", layered=True, priority=5, overrides={"web": {"env": {"B": "x"}}})
    other = DeviceInfo("cam-2", "cpu", {"site": "lab"})
    lines = [
        (p.module, p.origin, p.devices)
        for p in placements(resolve([CAM, other], [BASE, layer], CHAINS), "debug")
    ]
    assert lines == [
        ("db", "from 'base'", ["cam-1", "cam-2"]),
        ("web", "from 'base' (env.B by 'debug')", ["cam-1", "cam-2"]),
    ]


def test_explain_shows_the_base_the_layers_and_every_module_s_provenance() -> None:
    layer = deployment("debug", layered=True, priority=5, overrides={"web": {"env": {"B": "x"}}})
    broken = deployment("broken", layered=True, priority=6, overrides={"nope": {"env": {"B": "x"}}})
    why = explain(CAM, [BASE, layer, broken], CHAINS)
    outcomes = {c.deployment: c.outcome for c in why.candidates}
    assert outcomes["base"] == "wins"
    assert outcomes["debug"] == "layer: applies on top"
    assert outcomes["broken"].startswith("layer left out: overrides module 'nope'")
    assert {m.module: m.origin for m in why.modules} == {
        "db": "from 'base'",
        "web": "from 'base' (env.B by 'debug')",
    }


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        ({"overrides": {"web": {"env": {"A": "1"}}}}, "overrides", "needs 'layered: true'"),
        ({"layered": True}, "overrides", "needs 'modules' or 'overrides'"),
        ({"layered": True, "overrides": {"web": {"env": {"1A": "x"}}}}, "overrides.web.env", "not a valid"),
        (
            {"layered": True, "modules": {"web": {"images": {"cpu": "r/w:1"}}}, "overrides": {"web": {}}},
            "overrides",
            "in 'modules' as well",
        ),
        ({"modules": {}}, "modules", "at least 1 item"),
    ],
)
def test_bad_layers_name_the_field(doc: dict[str, Any], field: str, message: str) -> None:
    lines = problems(DeploymentManifest, {"name": "x", "target": LAB, **doc})
    assert any(line.startswith(f"{field}: ") and message in line for line in lines), lines


def test_each_module_carries_the_rest_of_the_chain_as_on_device_fallbacks() -> None:
    trt = DeviceInfo("trt-1", "tensorrt", {"site": "lab"})
    full = deployment(
        "full", modules={"web": {"images": {"tensorrt": "r/w:trt", "cuda": "r/w:cu", "cpu": "r/w:cpu"}}}
    )
    web = resolve([trt], [full], CHAINS).assignments["trt-1"].modules["web"]
    assert (web.profile, web.image) == ("tensorrt", "r/w:trt")
    assert [(f.profile, f.image) for f in web.fallbacks or []] == [("cuda", "r/w:cu"), ("cpu", "r/w:cpu")]
    only_cpu = deployment("cpu-only", modules={"web": {"images": {"cpu": "r/w:cpu"}}})
    web = resolve([trt], [only_cpu], CHAINS).assignments["trt-1"].modules["web"]
    assert (web.profile, web.fallbacks) == ("cpu", None)
