"""Accelerator detection from the real device profiles against fake /dev and /sys trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.detect import detect, match_rule
from modules.contract import DetectRule, DeviceProfile
from modules.profiles import load_profiles


@pytest.fixture(scope="module")
def profiles() -> list[DeviceProfile]:
    return list(load_profiles().values())


def touch(root: Path, rel: str, text: str = "") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def usb_device(root: Path, name: str, vendor: str, product: str, label: str = "") -> None:
    touch(root, f"sys/bus/usb/devices/{name}/idVendor", vendor + "\n")
    touch(root, f"sys/bus/usb/devices/{name}/idProduct", product + "\n")
    if label:
        touch(root, f"sys/bus/usb/devices/{name}/product", label + "\n")


def pci_device(root: Path, slot: str, vendor: str, device: str, pci_class: str) -> None:
    touch(root, f"sys/bus/pci/devices/{slot}/vendor", vendor + "\n")
    touch(root, f"sys/bus/pci/devices/{slot}/device", device + "\n")
    touch(root, f"sys/bus/pci/devices/{slot}/class", pci_class + "\n")


def test_bare_machine_only_has_the_profiles_that_need_nothing(
    tmp_path: Path, profiles: list[DeviceProfile]
) -> None:
    usb_device(tmp_path, "usb1", "1d6b", "0002", "EHCI Host Controller")
    pci_device(tmp_path, "0000:00:02.0", "0x8086", "0x3e92", "0x030000")  # Intel graphics, not an NPU
    found = detect(profiles, tmp_path)
    assert found.accelerators == []
    assert set(found.profiles) == {p.name for p in profiles if p.detect.always}
    assert "cpu" in found.profiles


def test_nvidia_device_nodes_but_not_nvidiactl(tmp_path: Path, profiles: list[DeviceProfile]) -> None:
    for node in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        touch(tmp_path, f"dev/{node}")
    found = detect(profiles, tmp_path)
    assert [(a.kind, a.path) for a in found.accelerators] == [
        ("nvidia-gpu", "/dev/nvidia0"),
        ("nvidia-gpu", "/dev/nvidia1"),
    ]
    assert {"cuda", "tensorrt"} <= set(found.profiles)
    assert "openvino-myriad" not in found.profiles


def test_movidius_stick_by_usb_vendor_before_and_after_firmware_boot(
    tmp_path: Path, profiles: list[DeviceProfile]
) -> None:
    usb_device(tmp_path, "1-1", "03e7", "2485", "Movidius MyriadX")
    usb_device(tmp_path, "2-3", "03E7", "f63b", "VSC Loopback Device")
    usb_device(tmp_path, "1-2", "046d", "c52b", "Unifying Receiver")
    found = detect(profiles, tmp_path)
    assert [(a.kind, a.path) for a in found.accelerators] == [
        ("movidius-myriad", "/sys/bus/usb/devices/1-1"),
        ("movidius-myriad", "/sys/bus/usb/devices/2-3"),
    ]
    assert found.accelerators[0].detail == "usb 03e7:2485 Movidius MyriadX"
    assert "openvino-myriad" in found.profiles


def test_hddl_card_needs_its_daemon_socket_and_its_vpus(
    tmp_path: Path, profiles: list[DeviceProfile]
) -> None:
    touch(tmp_path, "var/tmp/hddl_service.sock")
    assert "openvino-vadm" not in detect(profiles, tmp_path).profiles  # daemon without a card
    usb_device(tmp_path, "3-1", "03e7", "f63b")
    found = detect(profiles, tmp_path)
    assert "openvino-vadm" in found.profiles
    assert ("hddl", "/var/tmp/hddl_service.sock") in [(a.kind, a.path) for a in found.accelerators]


def test_a_movidius_stick_is_not_an_hddl_card(tmp_path: Path, profiles: list[DeviceProfile]) -> None:
    usb_device(tmp_path, "1-1", "03e7", "2485")
    found = detect(profiles, tmp_path)
    assert "openvino-vadm" not in found.profiles
    assert {a.kind for a in found.accelerators} == {"movidius-myriad"}


def test_xilinx_management_nodes(tmp_path: Path, profiles: list[DeviceProfile]) -> None:
    touch(tmp_path, "dev/xclmgmt256")
    touch(tmp_path, "dev/xclmgmt512")
    found = detect(profiles, tmp_path)
    assert [a.path for a in found.accelerators if a.kind == "xilinx-fpga"] == [
        "/dev/xclmgmt256",
        "/dev/xclmgmt512",
    ]
    assert "fpga" in found.profiles


def test_intel_npu_needs_the_accel_node_and_the_pci_function(
    tmp_path: Path, profiles: list[DeviceProfile]
) -> None:
    touch(tmp_path, "dev/accel/accel0")  # could be a Habana or AMD XDNA device alone
    assert "npu" not in detect(profiles, tmp_path).profiles
    pci_device(tmp_path, "0000:00:0b.0", "0x8086", "0x7d1d", "0x120000")
    found = detect(profiles, tmp_path)
    npu = [(a.path, a.detail) for a in found.accelerators if a.kind == "intel-npu"]
    assert npu == [
        ("/dev/accel/accel0", ""),
        ("/sys/bus/pci/devices/0000:00:0b.0", "pci 8086:7d1d class 120000"),
    ]
    assert found.profiles.count("npu") == 1


def test_pci_class_prefix_must_match(tmp_path: Path) -> None:
    pci_device(tmp_path, "0000:00:02.0", "0x8086", "0x3e92", "0x030000")
    rule = DetectRule(kind="pci_vendor", value="8086", pci_class="1200", accelerator="intel-npu")
    assert match_rule(rule, tmp_path) == []
    any_class = DetectRule(kind="pci_vendor", value="8086", accelerator="intel-npu")
    assert [a.path for a in match_rule(any_class, tmp_path)] == ["/sys/bus/pci/devices/0000:00:02.0"]


def test_a_new_profile_needs_no_code(tmp_path: Path, profiles: list[DeviceProfile]) -> None:
    cpu = next(p for p in profiles if p.name == "cpu")
    data = cpu.model_dump()
    data.update(
        name="custom-hailo",
        detect={"any_of": [{"kind": "path", "value": "/dev/hailo*", "accelerator": "intel-npu"}]},
    )
    custom = DeviceProfile.model_validate(data)
    touch(tmp_path, "dev/hailo0")
    found = detect([custom], tmp_path)
    assert found.profiles == ["custom-hailo"]
    assert [a.path for a in found.accelerators] == ["/dev/hailo0"]


def test_missing_sys_tree_finds_nothing(tmp_path: Path, profiles: list[DeviceProfile]) -> None:
    found = detect(profiles, tmp_path / "nothing-here")
    assert found.accelerators == []
