"""Pure helpers of the runtimes: profile container access as Docker options, labels, image spellings."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.runtime import labels as lb
from agent.runtime.access import AccessError, device_groups, docker_access, expand_devices
from agent.runtime.docker import parse_docker_time
from modules.contract import ContainerAccess
from modules.profiles import load_profiles

DIGEST = "sha256:" + "ab" * 32


def node(root: Path, rel: str, gid: int = 0) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    if gid:
        os.chown(path, -1, gid)


def test_globs_expand_to_the_nodes_present_and_plain_paths_pass_unchanged(tmp_path: Path) -> None:
    node(tmp_path, "/dev/xclmgmt256")
    node(tmp_path, "/dev/xclmgmt512")
    (tmp_path / "dev/dri").mkdir()
    assert expand_devices(["/dev/dri", "/dev/xclmgmt*"], tmp_path) == [
        "/dev/dri",
        "/dev/xclmgmt256",
        "/dev/xclmgmt512",
    ]
    assert expand_devices(["/dev/dri:/dev/dri:rw"], tmp_path) == ["/dev/dri:/dev/dri:rw"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["/dev/xclmgmt*"], r"no device node matches /dev/xclmgmt\*"),
        (["/dev/ion"], r"device /dev/ion \(from '/dev/ion'\) does not exist"),
        (["/dev/video*:/dev/video0"], r"a glob cannot name a container path"),
    ],
)
def test_missing_devices_are_named(tmp_path: Path, entries: list[str], message: str) -> None:
    with pytest.raises(AccessError, match=message):
        expand_devices(entries, tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_the_groups_owning_device_nodes_are_added(tmp_path: Path) -> None:
    node(tmp_path, "/dev/accel/accel0", gid=992)
    node(tmp_path, "/dev/other", gid=992)
    assert device_groups(["/dev/accel/accel0", "/dev/other:/dev/x"], tmp_path) == ["992"]
    access = ContainerAccess(devices=["/dev/accel/accel*"], group_add=["video"])
    assert docker_access(access, tmp_path).group_add == ["video", "992"]


def test_real_profiles_become_docker_options(tmp_path: Path) -> None:
    profiles = load_profiles()
    cuda = docker_access(profiles["cuda"].container, tmp_path).create_kwargs()
    [request] = cuda["device_requests"]
    assert (request["Driver"], request["Count"], request["Capabilities"]) == ("nvidia", -1, [["gpu"]])
    myriad = docker_access(profiles["openvino-myriad"].container, tmp_path).create_kwargs()
    assert myriad == {"device_cgroup_rules": ["c 189:* rmw"], "volumes": ["/dev/bus/usb:/dev/bus/usb"]}
    assert docker_access(profiles["cpu"].container, tmp_path).create_kwargs() == {}
    with pytest.raises(AccessError, match="/dev/dri"):
        docker_access(profiles["fpga"].container, tmp_path)
    (tmp_path / "dev/dri").mkdir(parents=True)
    with pytest.raises(AccessError, match="xclmgmt"):
        docker_access(profiles["fpga"].container, tmp_path)
    node(tmp_path, "/dev/xclmgmt256")
    assert docker_access(profiles["fpga"].container, tmp_path).devices == ["/dev/dri", "/dev/xclmgmt256"]


@pytest.mark.parametrize(
    ("image", "key", "local", "pull"),
    [
        ("digits", "digits:latest", "digits:latest", ("digits", "latest")),
        (
            "docker.io/library/python:3.11",
            "python:3.11",
            "docker.io/library/python:3.11",
            ("docker.io/library/python", "3.11"),
        ),
        ("docker.io/acme/app:1", "acme/app:1", "docker.io/acme/app:1", ("docker.io/acme/app", "1")),
        (
            f"127.0.0.1:5000/edge/digits:1@{DIGEST}",
            f"127.0.0.1:5000/edge/digits@{DIGEST}",
            f"127.0.0.1:5000/edge/digits@{DIGEST}",
            ("127.0.0.1:5000/edge/digits", DIGEST),
        ),
        (
            "localhost:5000/library/x:2",
            "localhost:5000/library/x:2",
            "localhost:5000/library/x:2",
            ("localhost:5000/library/x", "2"),
        ),
    ],
)
def test_image_spellings(image: str, key: str, local: str, pull: tuple[str, str]) -> None:
    assert lb.presence_key(image) == key
    assert lb.local_reference(image) == local
    assert lb.pull_reference(image) == pull


def test_ownership_needs_the_managed_label_the_module_and_the_device() -> None:
    ours = {lb.MANAGED: "true", lb.MODULE: "digits", lb.DEVICE: "pump-1"}
    assert lb.is_ours(ours, None)
    assert lb.is_ours(ours, "pump-1")
    assert not lb.is_ours(ours, "pump-2")
    assert not lb.is_ours({lb.MODULE: "digits"}, None)
    assert not lb.is_ours({lb.MANAGED: "true"}, None)
    assert not lb.is_ours(None, None)
    assert lb.ownership_filters("pump-1") == [f"{lb.MANAGED}=true", f"{lb.DEVICE}=pump-1"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T10:11:12.123456789Z", datetime(2026, 3, 1, 10, 11, 12, 123456, tzinfo=timezone.utc)),
        ("2026-03-01T10:11:12Z", datetime(2026, 3, 1, 10, 11, 12, tzinfo=timezone.utc)),
        ("2026-03-01T12:11:12.5+02:00", datetime(2026, 3, 1, 10, 11, 12, 500000, tzinfo=timezone.utc)),
        ("0001-01-01T00:00:00Z", None),
        ("", None),
        (None, None),
    ],
)
def test_docker_times(text: str | None, expected: datetime | None) -> None:
    assert parse_docker_time(text) == expected
