"""The simulated fleet's placement of devices on the nodes of a cluster (pure: nothing connects)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.simulate import FleetOptions, SimDevice, SimulatedFleet, device_ids, shares

NODES = "mqtt://127.0.0.1:1001,mqtt://127.0.0.1:1002,mqtt://127.0.0.1:1003"


def _first_node(fleet: SimulatedFleet) -> dict[str, int]:
    return {m.device.device_id: int(m.config.broker.url.rsplit(":", 1)[1]) - 1001 for m in fleet.members}


def test_device_i_of_the_fleet_tries_node_i_mod_n_first_whichever_worker_runs_it(tmp_path: Path) -> None:
    devices = [SimDevice(d) for d in device_ids(12)]
    key = Ed25519PrivateKey.generate().public_key()
    seen: dict[str, int] = {}
    for k, part in enumerate(shares(devices, 5)):
        options = FleetOptions(broker_url=NODES, state_root=tmp_path / str(k))
        seen |= _first_node(SimulatedFleet(part, key, options))
    assert seen == {d.device_id: i % 3 for i, d in enumerate(devices)}


def test_shares_deal_every_device_once_and_keep_a_given_place() -> None:
    devices = [SimDevice(d) for d in device_ids(7)] + [SimDevice("pinned", index=100)]
    parts = shares(devices, 3)
    assert sorted(d.device_id for part in parts for d in part) == sorted(d.device_id for d in devices)
    assert [len(p) for p in parts] == [3, 3, 2]
    placed = {d.device_id: d.index for part in parts for d in part}
    assert placed["sim-00001"] == 0 and placed["sim-00007"] == 6 and placed["pinned"] == 100


def test_a_fleet_run_alone_places_devices_by_their_position(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    fleet = SimulatedFleet(
        [SimDevice(d) for d in device_ids(4)], key, FleetOptions(broker_url=NODES, state_root=tmp_path)
    )
    assert list(_first_node(fleet).values()) == [0, 1, 2, 0]
