"""Device provisioning on SQLite: ``edgectl device ...`` and ``edgectl broker config`` through ``main``.

Checks what provisioning leaves behind: the agent configuration loads with ``agent/config.py``,
its password matches the stored hash and the password file, the password is stored nowhere else,
removal takes the credentials out, and bad input exits 2 with one line naming the problem.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_agent_config
from cloud import broker
from cloud.api.routes_devices import ROUTES, add_device
from cloud.cli import main
from cloud.config import resolve_settings
from cloud.devices import AgentBundle, DeviceManager, Provisioned
from cloud.keys import KeyFileError, load_or_create_signing_key, private_key_path, public_key_path
from cloud.store.db import open_database
from cloud.store.devices import Device
from cloud.store.errors import InvalidInputError, NotFoundError
from cloud.store.fleet import DesiredRecord
from modules.signing import load_public_key_file, public_key_pem


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("EDGE_DATA_DIR", str(d))
    monkeypatch.delenv("EDGE_DB_URL", raising=False)
    return d


@pytest.fixture
def manager(data_dir: Path) -> Any:
    m = DeviceManager.open(resolve_settings(data_dir))
    yield m
    m.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def password_file(data_dir: Path) -> dict[str, str]:
    return broker.parse_password_file((data_dir / "broker" / "passwd").read_text())


# ---- add ----------------------------------------------------------------------------------------


def test_add_writes_an_agent_config_that_loads_and_matches_the_stored_hash(
    capsys: pytest.CaptureFixture[str], data_dir: Path, manager: DeviceManager
) -> None:
    result = run_json(
        capsys,
        "device",
        "add",
        "pump-17",
        "--tag",
        "site=plant-a",
        "--profile",
        "cpu",
        "--runtime",
        "process",
    )
    assert result["device"]["id"] == "pump-17"
    assert result["device"]["tags"] == {"site": "plant-a"}
    assert result["password"] is None

    config_file = Path(result["config_file"])
    assert config_file == data_dir / "devices" / "pump-17" / "agent.yaml"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    config = load_agent_config(config_file)
    assert (config.device_id, config.mqtt_username, config.runtime) == ("pump-17", "pump-17", "process")
    assert config.broker.url == "mqtt://127.0.0.1:1883"
    assert config.state_dir == Path("/var/lib/edge-agent")
    password = config.broker.read_password()
    assert password is not None and len(password) >= 40

    with manager.db.transaction() as session:
        row = session.get(Device, "pump-17")
        assert row is not None
        assert broker.verify_password(password, row.password_hash)
    assert broker.verify_password(password, password_file(data_dir)["pump-17"])

    signing_key = load_or_create_signing_key(data_dir)
    assert public_key_pem(load_public_key_file(config.cloud_public_key)) == public_key_pem(signing_key)


def test_the_password_is_stored_only_in_the_agent_config(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    result = run_json(capsys, "device", "add", "pump-1", "--show-password")
    password = result["password"].encode()
    holders = sorted(
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.is_file() and password in p.read_bytes()
    )
    assert holders == ["devices/pump-1/agent.yaml"]


def test_cli_and_api_show_one_provisioned_document_with_the_password_only_when_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    quiet = run_json(capsys, "device", "add", "pump-1")
    shown = run_json(capsys, "device", "add", "pump-2", "--show-password")
    (route,) = [r for r in ROUTES if r.handler is add_device]
    assert route.response is Provisioned
    assert Provisioned.model_validate(quiet).password is None
    assert shown["password"] and Provisioned.model_validate(shown).password == shown["password"]
    assert set(quiet) == set(shown) == set(Provisioned.model_fields)
    assert "reload the broker" in quiet["broker"]
    assert "s3cret" not in repr(Provisioned.model_validate({**shown, "password": "s3cret"}))


def test_add_prints_where_the_config_is_and_the_password_only_when_asked(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    code, out, err = run(capsys, "device", "add", "pump-1")
    assert code == 0
    assert out.splitlines()[0] == "added device pump-1 (profile cpu)"
    assert str(data_dir / "devices" / "pump-1" / "agent.yaml") in out
    assert "password (shown once)" not in out
    assert "reload the broker" in err

    code, out, _ = run(capsys, "device", "add", "pump-2", "--show-password")
    password = load_agent_config(data_dir / "devices" / "pump-2" / "agent.yaml").broker.read_password()
    assert f"MQTT password (shown once): {password}" in out


def test_add_uses_the_broker_recorded_by_broker_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    cert, key, ca = (tmp_path / n for n in ("server.pem", "server.key", "ca.pem"))
    for f in (cert, key, ca):
        f.write_text(f"-----BEGIN TEST {f.name}-----\n")
    out_dir = tmp_path / "mq"
    conf = run_json(
        capsys,
        "broker",
        "config",
        "--out",
        str(out_dir),
        "--url",
        "mqtts://broker.example.com:8883",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--ca",
        str(ca),
    )
    assert conf["url"] == "mqtts://broker.example.com:8883"
    text = (out_dir / "mosquitto.conf").read_text()
    assert "listener 8883 127.0.0.1" in text and f"certfile {cert}" in text

    result = run_json(capsys, "device", "add", "gw-1", "--out", str(tmp_path / "gw-1"))
    config = load_agent_config(result["config_file"])
    assert config.broker.url == "mqtts://broker.example.com:8883"
    assert config.broker.ca_file == tmp_path / "gw-1" / "ca.pem"
    assert config.broker.ca_file.read_bytes() == ca.read_bytes()
    assert "no broker running" in result["broker"]


def test_broker_config_points_at_the_generated_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    conf = run_json(capsys, "broker", "config", "--out", str(tmp_path / "mq"), "--port", "1884")
    lines = Path(conf["config_file"]).read_text().splitlines()
    assert f"password_file {conf['password_file']}" in lines
    assert f"acl_file {conf['acl_file']}" in lines
    assert f"pid_file {tmp_path / 'mq' / 'mosquitto.pid'}" in lines
    assert "allow_anonymous false" in lines and "listener 1884 127.0.0.1" in lines
    assert Path(conf["password_file"]).is_file() and Path(conf["acl_file"]).is_file()
    assert conf["url"] == "mqtt://127.0.0.1:1884"
    assert conf["cloud_url"] == "mqtt://127.0.0.1:1885" and "listener 1885 127.0.0.1" in lines
    assert conf["user"] == pwd.getpwuid(os.geteuid()).pw_name and f"user {conf['user']}" in lines


# ---- list, show, tag, remove ------------------------------------------------------------------


def test_list_filters_by_tag_and_profile(capsys: pytest.CaptureFixture[str]) -> None:
    run_json(capsys, "device", "add", "a-1", "--tag", "site=a", "--tag", "ring=canary")
    run_json(capsys, "device", "add", "a-2", "--tag", "site=a", "--profile", "cuda")
    run_json(capsys, "device", "add", "b-1", "--tag", "site=b")

    assert [d["id"] for d in run_json(capsys, "device", "list")] == ["a-1", "a-2", "b-1"]
    assert [d["id"] for d in run_json(capsys, "device", "list", "--tag", "site=a")] == ["a-1", "a-2"]
    assert [
        d["id"] for d in run_json(capsys, "device", "list", "--tag", "site=a", "--tag", "ring=canary")
    ] == ["a-1"]
    assert [d["id"] for d in run_json(capsys, "device", "list", "--profile", "cuda")] == ["a-2"]

    code, out, _ = run(capsys, "device", "list")
    assert code == 0
    header = ["ID", "PRESENCE", "LAST", "SEEN", "PROFILE", "AGENT", "GEN", "STATUS", "MODULES", "TAGS"]
    assert out.splitlines()[0].split() == header
    assert out.splitlines()[1].split()[0:5] == ["a-1", "never", "seen", "-", "cpu"]
    assert out.splitlines()[1].endswith("ring=canary,site=a")
    assert [d["id"] for d in run_json(capsys, "device", "list", "--status", "never seen")] == [
        "a-1",
        "a-2",
        "b-1",
    ]
    assert run_json(capsys, "device", "list", "--status", "online") == []


def test_show_and_tag(capsys: pytest.CaptureFixture[str]) -> None:
    run_json(capsys, "device", "add", "pump-1", "--tag", "site=a", "--tag", "ring=canary")
    shown = run_json(capsys, "device", "show", "pump-1")
    assert (shown["profile"], shown["tags"]) == ("cpu", {"ring": "canary", "site": "a"})
    assert shown["created_at"].endswith("Z")

    tagged = run_json(capsys, "device", "tag", "pump-1", "site=b", "floor=2", "--remove", "ring")
    assert tagged["tags"] == {"floor": "2", "site": "b"}
    assert run_json(capsys, "device", "show", "pump-1")["tags"] == {"floor": "2", "site": "b"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_remove_takes_the_credentials_out(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pump-1 was never deployed to and never reported: nothing retained to clear, so no broker is
    needed (none answers here) and the id can be provisioned again at once."""
    monkeypatch.setenv("EDGE_BROKER_URL", f"mqtt://127.0.0.1:{closed_port()}")
    run_json(capsys, "device", "add", "pump-1")
    run_json(capsys, "device", "add", "pump-2")
    assert {"pump-1", "pump-2"} <= set(password_file(data_dir))

    code, out, err = run(capsys, "device", "remove", "pump-1", "--json")
    assert code == 0, err
    removed = json.loads(out)
    assert removed["removed"]["id"] == "pump-1"
    assert (removed["retained_cleared"], removed["retained_pending"], removed["error"]) == ([], [], None)
    assert "warning" not in err
    assert set(password_file(data_dir)) == {"pump-2", broker.CLOUD_USER}
    assert not (data_dir / "devices" / "pump-1").exists()
    assert [d["id"] for d in run_json(capsys, "device", "list")] == ["pump-2"]

    again = run_json(capsys, "device", "add", "pump-1")
    assert Path(again["config_file"]).is_file()


def test_a_deployed_device_cannot_come_back_before_its_retained_state_is_cleared(
    capsys: pytest.CaptureFixture[str], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pump-1 had a desired state, so its retained one must be cleared first; no broker answers here
    (tests/integration/test_fleet_publish.py clears it through a real one)."""
    monkeypatch.setenv("EDGE_BROKER_URL", f"mqtt://127.0.0.1:{closed_port()}")
    run_json(capsys, "device", "add", "pump-1")
    db = open_database(resolve_settings(data_dir).db_url)
    try:
        with db.transaction() as s:
            s.add(
                DesiredRecord(
                    device_id="pump-1", generation=4, content_hash="h", payload="{}", published=True
                )
            )
    finally:
        db.dispose()

    code, out, err = run(capsys, "device", "remove", "pump-1", "--json")
    assert code == 0, err
    removed = json.loads(out)
    assert removed["retained_pending"] == ["pump-1"] and removed["retained_cleared"] == []
    assert "cannot reach the MQTT broker" in removed["error"]
    assert "warning: the retained messages of pump-1 are not cleared yet" in err

    code, out, err = run(capsys, "device", "add", "pump-1")
    assert code == 2 and out == ""
    assert "device 'pump-1' was removed, but the broker has not yet cleared its retained messages" in err


def test_sync_rewrites_a_lost_password_file(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    run_json(capsys, "device", "add", "pump-1")
    before = password_file(data_dir)
    (data_dir / "broker" / "passwd").unlink()
    run_json(capsys, "broker", "sync")
    after = password_file(data_dir)
    assert after["pump-1"] == before["pump-1"]
    assert broker.verify_password(
        broker.cloud_credentials(broker.BrokerPaths.of(data_dir))[1], after["_cloud"]
    )


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["device", "add", "pump 1"], "invalid device id: 'pump 1' is not a valid name"),
        (["device", "add", "site/pump"], "invalid device id: 'site/pump' is not a valid name"),
        (["device", "add", "pump+"], "invalid device id: 'pump+' is not a valid name"),
        (["device", "add", "pump#"], "invalid device id: 'pump#' is not a valid name"),
        (["device", "add", "Pump"], "invalid device id: 'Pump' is not a valid name"),
        (["device", "add", "_cloud"], "invalid device id: '_cloud' is not a valid name"),
        (["device", "add", "pump-1", "--profile", "gpu"], "unknown device profile 'gpu' (known in "),
        (["device", "add", "pump-1", "--tag", "site"], "--tag 'site': expected KEY=VALUE"),
        (["device", "add", "pump-1", "--broker-url", "http://x"], "broker URL 'http://x': expected mqtt://"),
        (
            ["device", "add", "pump-1", "--ca", "/nonexistent.pem"],
            "--ca /nonexistent.pem: a CA needs TLS; use an mqtts:// broker URL",
        ),
        (["device", "remove", "ghost"], "device 'ghost' does not exist"),
        (["device", "show", "ghost"], "device 'ghost' does not exist"),
        (["device", "tag", "ghost", "a=b"], "device 'ghost' does not exist"),
        (
            ["broker", "config", "--out", "x", "--tls-cert", "/nonexistent"],
            "--tls-cert /nonexistent: no such file",
        ),
        (["broker", "config", "--out", "x", "--bind", "localhost"], "--bind 'localhost': not an IP address"),
        (["broker", "config", "--out", "x", "--port", "70000"], "--port 70000: must be between 1 and 65535"),
        (["broker", "reload"], "no pid file recorded"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(f"edgectl: error: {message}")


def test_duplicate_add_is_refused_and_keeps_the_first_credentials(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    run_json(capsys, "device", "add", "pump-1")
    config_file = data_dir / "devices" / "pump-1" / "agent.yaml"
    first = config_file.read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "device", "add", "pump-1", *extra)
        assert code == 2
        assert err == (
            "edgectl: error: device 'pump-1' already exists (edgectl device remove pump-1 first to "
            "provision it again with new credentials)\n"
        )
        assert config_file.read_bytes() == first


def test_existing_agent_config_is_not_overwritten_without_force(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "cfg"
    out_dir.mkdir()
    (out_dir / "agent.yaml").write_text("keep me\n")
    code, _, err = run(capsys, "device", "add", "pump-1", "--out", str(out_dir))
    assert code == 2
    assert err == f"edgectl: error: {out_dir / 'agent.yaml'} already exists (use --force to overwrite it)\n"
    assert (out_dir / "agent.yaml").read_text() == "keep me\n"
    assert run_json(capsys, "device", "list") == []
    run_json(capsys, "device", "add", "pump-1", "--out", str(out_dir), "--force")
    assert load_agent_config(out_dir / "agent.yaml").device_id == "pump-1"


def test_tag_errors_name_the_problem(manager: DeviceManager) -> None:
    manager.add("pump-1", tags={"site": "a"})
    with pytest.raises(InvalidInputError, match="device 'pump-1' has no tag 'ring'"):
        manager.tag("pump-1", {}, ["ring"])
    with pytest.raises(InvalidInputError, match="nothing to change"):
        manager.tag("pump-1", {})
    with pytest.raises(InvalidInputError, match="tag 'site' is both set and removed"):
        manager.tag("pump-1", {"site": "b"}, ["site"])
    with pytest.raises(InvalidInputError, match="invalid tag key ' x'"):
        manager.tag("pump-1", {" x": "1"})
    with pytest.raises(NotFoundError):
        manager.remove("pump-2")
    assert manager.show("pump-1").tags == {"site": "a"}


def test_failed_broker_file_write_leaves_no_device_and_no_config(
    manager: DeviceManager, data_dir: Path, tmp_path: Path
) -> None:
    manager.add("pump-1")
    (data_dir / "broker" / "passwd").unlink()
    (data_dir / "broker" / "passwd").mkdir()  # the rename onto it fails
    out_dir = tmp_path / "cfg"
    with pytest.raises(broker.BrokerError, match="cannot write"):
        manager.add("pump-2", bundle=AgentBundle(out_dir=out_dir))
    assert [d.id for d in manager.list_devices()] == ["pump-1"]
    assert not (out_dir / "agent.yaml").exists()


def test_concurrent_adds_all_land_in_the_password_file(data_dir: Path) -> None:
    settings = resolve_settings(data_dir)
    DeviceManager.open(settings).close()  # create the schema once

    def add(device_id: str) -> None:
        m = DeviceManager.open(settings)
        try:
            m.add(device_id)
        finally:
            m.close()

    ids = [f"pump-{i}" for i in range(6)]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        list(pool.map(add, ids))
    assert set(password_file(data_dir)) == {*ids, broker.CLOUD_USER}


# ---- the signing key ------------------------------------------------------------------------------


def test_signing_key_is_created_once_with_private_permissions(data_dir: Path) -> None:
    key = load_or_create_signing_key(data_dir)
    path = private_key_path(data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_or_create_signing_key(data_dir)
    assert public_key_pem(again) == public_key_pem(key)
    assert public_key_path(data_dir).read_bytes() == public_key_pem(key)


def test_signing_key_readable_by_others_is_refused(data_dir: Path) -> None:
    load_or_create_signing_key(data_dir)
    private_key_path(data_dir).chmod(0o644)
    with pytest.raises(KeyFileError, match=r"readable by others \(mode 0644\); run: chmod 600"):
        load_or_create_signing_key(data_dir)
