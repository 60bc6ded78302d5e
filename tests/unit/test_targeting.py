"""Targeting: which deployment wins per device, and each module's image by profile and fallback."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cloud.fleet.model_update import with_model, with_module_images
from cloud.fleet.targeting import (
    DeploymentEntry,
    DeviceInfo,
    TargetingError,
    choose_image,
    device_modules,
    resolve,
)
from cloud.store.errors import InvalidInputError
from modules.contract import DeploymentManifest, ModuleSpec
from modules.profiles import fallback_chain, load_profiles

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CHAINS = {name: fallback_chain(name, load_profiles()) for name in load_profiles()}


def entry(
    name: str, target: dict[str, Any], *, priority: int = 0, age: int = 0, **module: Any
) -> DeploymentEntry:
    images = module.pop("images", {"cpu": f"reg.local/{name}:1"})
    manifest = DeploymentManifest.model_validate(
        {
            "name": name,
            "target": target,
            "priority": priority,
            "modules": {"web": {"images": images, **module}},
        }
    )
    return DeploymentEntry(manifest, T0 - timedelta(minutes=age))


FLEET = [
    DeviceInfo("cam-1", "cpu", {"site": "a"}),
    DeviceInfo("cam-2", "tensorrt", {"site": "a"}),
    DeviceInfo("cam-3", "cuda", {"site": "b"}),
    DeviceInfo("gw-1", "openvino-myriad", {"site": "b", "role": "gw"}),
]


@pytest.mark.parametrize(
    ("profile", "images", "expected"),
    [
        ("cpu", {"cpu": "r/a:1"}, ("cpu", "r/a:1")),
        ("tensorrt", {"cpu": "r/a:1", "tensorrt": "r/a:trt"}, ("tensorrt", "r/a:trt")),
        ("tensorrt", {"cpu": "r/a:1", "cuda": "r/a:cu"}, ("cuda", "r/a:cu")),
        ("tensorrt", {"cpu": "r/a:1"}, ("cpu", "r/a:1")),
        ("openvino-myriad", {"cpu": "r/a:1", "cuda": "r/a:cu"}, ("cpu", "r/a:1")),
    ],
)
def test_image_by_profile_and_fallback(
    profile: str, images: dict[str, str], expected: tuple[str, str]
) -> None:
    spec = ModuleSpec.model_validate({"images": images})
    assert choose_image("web", spec, profile, CHAINS[profile]) == expected


def test_no_image_names_module_profile_and_chain() -> None:
    spec = ModuleSpec.model_validate({"images": {"fpga": "r/a:fpga"}})
    with pytest.raises(TargetingError) as err:
        choose_image("web", spec, "tensorrt", CHAINS["tensorrt"])
    assert str(err.value) == (
        "module 'web' has no image for profile 'tensorrt' (tried tensorrt → cuda → cpu; "
        "images given for: fpga)"
    )


def test_device_modules_copy_settings_and_record_profile_used() -> None:
    e = entry("d", {"tags": {"site": "a"}}, images={"cpu": "r/a:1", "cuda": "r/a:cu"}, env={"A": "1"})
    modules = device_modules(e.manifest, "tensorrt", CHAINS["tensorrt"])
    assert modules["web"].image == "r/a:cu"
    assert modules["web"].profile == "cuda"
    assert modules["web"].env == {"A": "1"}


@pytest.mark.parametrize(
    ("deployments", "expected"),
    [
        # one deployment by tag
        ([entry("a", {"tags": {"site": "a"}})], {"cam-1": "a", "cam-2": "a"}),
        # by profile
        ([entry("a", {"profile": "cuda"})], {"cam-3": "a"}),
        # by device ids, ANDed with tags
        ([entry("a", {"device_ids": ["cam-1", "gw-1"], "tags": {"site": "b"}})], {"gw-1": "a"}),
        # higher priority wins where targets overlap
        (
            [entry("low", {"tags": {"site": "a"}}), entry("high", {"device_ids": ["cam-1"]}, priority=5)],
            {"cam-1": "high", "cam-2": "low"},
        ),
        # equal priority, identical content: the newest wins, no conflict
        (
            [
                entry("old", {"tags": {"site": "b"}}, age=10, images={"cpu": "r/x:1"}),
                entry("new", {"profile": "cuda"}, age=1, images={"cpu": "r/x:1"}),
            ],
            {"cam-3": "new", "gw-1": "old"},
        ),
        # nothing selected
        ([entry("a", {"tags": {"site": "zz"}})], {}),
    ],
)
def test_winner_per_device(deployments: list[DeploymentEntry], expected: dict[str, str]) -> None:
    result = resolve(FLEET, deployments, CHAINS)
    assert {d: a.deployment.name for d, a in result.assignments.items()} == expected
    assert result.conflicts == []
    assert result.problems == []


def test_equal_priority_different_content_is_a_conflict_naming_both() -> None:
    deployments = [entry("alpha", {"tags": {"site": "a"}}), entry("beta", {"device_ids": ["cam-2"]})]
    result = resolve(FLEET, deployments, CHAINS)
    assert result.conflicts == [("cam-2", "alpha", "beta")]
    assert result.conflict_messages("beta") == [
        "deployments 'alpha' and 'beta' have the same priority and give different modules to 1 device(s) "
        "(cam-2): change one's priority or target"
    ]
    assert result.conflict_messages("gamma") == []


def test_unplaceable_profile_reported_once_per_deployment_and_profile() -> None:
    devices = [DeviceInfo(f"fp-{i}", "fpga", {"site": "c"}) for i in range(7)]
    result = resolve(devices, [entry("a", {"tags": {"site": "c"}}, images={"cuda": "r/a:cu"})], CHAINS)
    assert result.assignments == {}
    assert result.problems == [
        "deployment 'a': module 'web' has no image for profile 'fpga' (tried fpga → cpu; images given for: "
        "cuda) (7 device(s): fp-0, fp-1, fp-2, fp-3, fp-4 and 2 more)"
    ]


def test_devices_alike_but_for_their_id_are_decided_one_by_one() -> None:
    """resolve decides once per (profile, tags, id-target memberships): ids listed by a target must
    still be told apart from their look-alikes, conflicts included."""
    devices = [DeviceInfo(f"cam-{i}", "cpu", {"site": "a"}) for i in range(6)]
    deployments = [
        entry("all", {"tags": {"site": "a"}}, age=10),
        entry("pinned", {"device_ids": ["cam-2", "cam-4"]}, priority=5),
        entry("rival", {"device_ids": ["cam-5"]}, images={"cpu": "r/rival:1"}),
    ]
    result = resolve(devices, deployments, CHAINS)
    assert {d: a.deployment.name for d, a in result.assignments.items()} == {
        "cam-0": "all",
        "cam-1": "all",
        "cam-2": "pinned",
        "cam-3": "all",
        "cam-4": "pinned",
        "cam-5": "rival",  # equal priority, newer
    }
    assert result.conflicts == [("cam-5", "all", "rival")]
    assert result.assignments["cam-0"].modules["web"].image == "reg.local/all:1"


def test_set_model_swaps_only_the_module_images_given() -> None:
    e = entry("d", {"tags": {"site": "a"}}, images={"cpu": "r/a:1-cpu", "cuda": "r/a:1-cuda"})
    updated = with_module_images(e.manifest, "web", {"cuda": "r/a@sha256:" + "a" * 64})
    assert updated.modules["web"].images == {"cpu": "r/a:1-cpu", "cuda": "r/a@sha256:" + "a" * 64}
    assert updated.model_copy(update={"modules": e.manifest.modules}) == e.manifest
    with pytest.raises(InvalidInputError, match="deployment 'd' has no module 'nope' \\(modules: web\\)"):
        with_module_images(e.manifest, "nope", {})
    with pytest.raises(InvalidInputError, match="module 'web': no image is listed for profile\\(s\\) fpga"):
        with_module_images(e.manifest, "web", {"fpga": "r/a:f"})


def test_set_model_replaces_the_version_of_that_model_only() -> None:
    assert with_model(["digits:3", "iris:1"], "digits", 4) == [("digits", 4), ("iris", 1)]
    assert with_model([], "digits", 1) == [("digits", 1)]


def test_explain_names_the_competitors_the_winner_and_each_module_s_fallback() -> None:
    from cloud.fleet.explain import explain

    cam = DeviceInfo("cam-1", "tensorrt", {"site": "a"})
    deployments = [
        entry("base", {"tags": {"site": "a"}}, priority=0),
        entry(
            "vision",
            {"tags": {"site": "a"}},
            priority=10,
            images={"cpu": "reg.local/v:1", "cuda": "reg.local/v:1-cuda"},
        ),
        entry("old-vision", {"device_ids": ["cam-1"]}, priority=10, age=5),
        entry("elsewhere", {"tags": {"site": "b"}}, priority=99),
    ]
    why = explain(cam, deployments, CHAINS)
    assert why.chain == ["tensorrt", "cuda", "cpu"]
    assert [(c.deployment, c.outcome) for c in why.candidates] == [
        ("vision", "wins"),
        ("old-vision", "loses: same priority, applied before the winner"),
        ("base", "loses: priority 0 < 10"),
    ]
    [web] = why.modules
    assert (web.deployment, web.profile, web.image) == ("vision", "cuda", "reg.local/v:1-cuda")
    assert web.note == "fallback: no image for tensorrt"
    assert why.problem is None
    winner = resolve([cam], deployments, CHAINS).assignments["cam-1"]
    assert winner.deployment.name == "vision", "explain agrees with resolve"


def test_explain_says_why_a_device_runs_nothing() -> None:
    from cloud.fleet.explain import explain

    cam = DeviceInfo("cam-2", "openvino-myriad", {"site": "a"})
    assert explain(cam, [], CHAINS).problem == "no deployment selects this device"
    only_cuda = entry("gpu", {"tags": {"site": "a"}}, images={"cuda": "reg.local/g:1"})
    why = explain(cam, [only_cuda], CHAINS)
    assert why.modules == [] and why.problem is not None and "has no image for profile" in why.problem
