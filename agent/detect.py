"""Accelerator detection, driven by the device profiles' ``detect`` rules (no code per profile).

A rule matches a path glob (``/dev/nvidia[0-9]*``, ``/dev/accel/accel*``), a USB vendor id in
``/sys/bus/usb/devices/*/idVendor`` (Movidius ``03e7``) or a PCI vendor id, optionally with a
class prefix, in ``/sys/bus/pci/devices/*/{vendor,class}``. Everything is read below ``root``
(``/`` on a device, a fake tree in tests). Adding a profile file with new rules needs no change here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modules.contract import Accelerator, DetectRule, DeviceProfile

USB_DEVICES = "sys/bus/usb/devices"
PCI_DEVICES = "sys/bus/pci/devices"


@dataclass(frozen=True)
class Detection:
    """What was found: the accelerators, and the profiles whose hardware is present (in the order given)."""

    accelerators: list[Accelerator]
    profiles: list[str]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _hex_id(value: str) -> str:
    return value.strip().lower().removeprefix("0x")


def _shown(path: Path, root: Path) -> str:
    """``path`` as it is on the device (without the test root)."""
    return "/" + str(path.relative_to(root))


def _by_path(rule: DetectRule, root: Path) -> list[Accelerator]:
    return [
        Accelerator(kind=rule.accelerator, path=_shown(p, root))
        for p in sorted(root.glob(rule.value.lstrip("/")))
    ]


def _by_usb(rule: DetectRule, root: Path) -> list[Accelerator]:
    found = []
    for vendor_file in sorted((root / USB_DEVICES).glob("*/idVendor")):
        if _hex_id(_read(vendor_file)) != _hex_id(rule.value):
            continue
        dev = vendor_file.parent
        words = [
            f"usb {_read(vendor_file)}:{_read(dev / 'idProduct')}",
            _read(dev / "manufacturer"),
            _read(dev / "product"),
        ]
        found.append(
            Accelerator(kind=rule.accelerator, path=_shown(dev, root), detail=" ".join(w for w in words if w))
        )
    return found


def _by_pci(rule: DetectRule, root: Path) -> list[Accelerator]:
    found = []
    for vendor_file in sorted((root / PCI_DEVICES).glob("*/vendor")):
        if _hex_id(_read(vendor_file)) != _hex_id(rule.value):
            continue
        dev = vendor_file.parent
        pci_class = _hex_id(_read(dev / "class"))
        if rule.pci_class is not None and not pci_class.startswith(_hex_id(rule.pci_class)):
            continue
        detail = f"pci {_hex_id(rule.value)}:{_hex_id(_read(dev / 'device'))} class {pci_class}"
        found.append(Accelerator(kind=rule.accelerator, path=_shown(dev, root), detail=detail))
    return found


_MATCHERS = {"path": _by_path, "usb_vendor": _by_usb, "pci_vendor": _by_pci}


def match_rule(rule: DetectRule, root: Path = Path("/")) -> list[Accelerator]:
    """The accelerators one rule finds below ``root``."""
    return _MATCHERS[rule.kind](rule, root)


def detect(profiles: Iterable[DeviceProfile], root: Path = Path("/")) -> Detection:
    """Run every profile's rules below ``root``.

    A profile is present when it is ``always`` present, or when every ``all_of`` rule matches and,
    if it has ``any_of`` rules, at least one of those does. Only the accelerators of present
    profiles are listed (a Movidius stick is not an HDDL card), each ``(kind, path)`` once.
    """
    accelerators: dict[tuple[str, str], Accelerator] = {}
    present: list[str] = []
    for profile in profiles:
        rules = profile.detect
        all_found = [match_rule(rule, root) for rule in rules.all_of]
        any_found = [match_rule(rule, root) for rule in rules.any_of]
        has_rules = bool(rules.all_of or rules.any_of)
        hit = has_rules and all(all_found) and (not rules.any_of or any(any_found))
        if hit or rules.always:
            present.append(profile.name)
        if hit:
            for acc in (acc for found in all_found + any_found for acc in found):
                accelerators.setdefault((acc.kind, acc.path), acc)
    return Detection(
        accelerators=sorted(accelerators.values(), key=lambda a: (a.kind, a.path)), profiles=present
    )
