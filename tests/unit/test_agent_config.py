"""The agent's config file: defaults, relative paths, secrets, and errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, BrokerConfig, load_agent_config
from modules.documents import DocumentError

MINIMAL = """\
device_id: pump-17
broker:
  url: mqtt://127.0.0.1:1883
cloud_public_key: cloud.pub
state_dir: state
"""


def write(folder: Path, text: str, name: str = "agent.yaml") -> Path:
    """Write ``text`` as the config file and the key it names; return the config's path."""
    (folder / "cloud.pub").write_text("-----BEGIN PUBLIC KEY-----\n")
    path = folder / name
    path.write_text(text)
    return path


def load_error(folder: Path, text: str) -> str:
    with pytest.raises(DocumentError) as info:
        load_agent_config(write(folder, text))
    return str(info.value)


def test_minimal_config_gets_defaults_and_absolute_paths(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, MINIMAL))
    assert config.device_id == "pump-17"
    assert config.cloud_public_key == tmp_path / "cloud.pub"
    assert config.state_dir == tmp_path / "state"
    assert config.runtime == "docker"
    assert (config.heartbeat_s, config.report_refresh_s, config.broker.keepalive_s) == (90.0, 3600.0, 135)
    assert config.metrics_port is None
    assert config.images_dir == tmp_path / "state" / "images"
    assert config.health_start_period_s == 120.0
    broker = config.broker
    assert (broker.host, broker.port, broker.tls, broker.protocol) == ("127.0.0.1", 1883, False, "mqttv5")
    assert (broker.reconnect_min_s, broker.reconnect_max_s) == (1, 60)
    assert config.mqtt_client_id == "pump-17"
    assert config.mqtt_username is None
    assert broker.read_password() is None


def test_full_config(tmp_path: Path) -> None:
    for name in ("ca.pem", "dev.crt", "dev.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "registry").write_text("s3cret\n")
    text = """\
device_id: pump-17
broker:
  url: mqtts://broker.example.com
  protocol: mqttv311
  client_id: pump-17-agent
  ca_file: ca.pem
  client_cert: dev.crt
  client_key: /ABS/dev.key
  keepalive_s: 20
  reconnect_min_s: 2
  reconnect_max_s: 120
cloud_public_key: cloud.pub
state_dir: /var/lib/edge-agent
runtime: process
restart: {base_s: 1, max_s: 30, reset_after_s: 60}
pull_retry: {base_s: 5, max_s: 50}
heartbeat_s: 15
metrics_port: 9100
registry_secrets:
  site: {username: puller, password_file: secrets/registry}
  other: {username: bob, password: inline}
""".replace("/ABS", str(tmp_path))
    config = load_agent_config(write(tmp_path, text))
    broker = config.broker
    assert (broker.host, broker.port, broker.tls) == ("broker.example.com", 8883, True)
    assert broker.protocol == "mqttv311"
    assert broker.ca_file == tmp_path / "ca.pem"
    assert broker.client_key == tmp_path / "dev.key"
    assert config.mqtt_client_id == "pump-17-agent"
    assert config.state_dir == Path("/var/lib/edge-agent")
    assert config.runtime == "process"
    assert config.registry_secrets["site"].password_file == tmp_path / "secrets" / "registry"
    assert config.registry_secrets["site"].read_password() == "s3cret"
    assert config.registry_secrets["other"].read_password() == "inline"
    planner = config.planner_config()
    assert (planner.restart.base_s, planner.restart.max_s, planner.restart.reset_after_s) == (1, 30, 60)
    assert (planner.pull_retry.base_s, planner.pull_retry.max_s) == (5, 50)


def test_password_defaults_username_to_device_id_and_is_not_printed(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, MINIMAL.replace("1883\n", "1883\n  password: hunter2\n")))
    assert config.mqtt_username == "pump-17"
    assert config.broker.read_password() == "hunter2"
    assert "hunter2" not in repr(config)


def test_password_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    text = MINIMAL.replace("1883\n", "1883\n  username: agent\n  password_file: pw\n")
    config = load_agent_config(write(tmp_path, text))
    assert config.mqtt_username == "agent"
    assert config.broker.read_password() == "from-file"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:1883", "expected mqtt://host[:port] or mqtts://host[:port]"),
        ("mqtt://", "names no host"),
        ("mqtt://h:99999", "not a valid URL"),
        ("mqtt://user:pw@h", "not in the URL"),
        ("mqtt://h/path", "no path, query or fragment"),
    ],
)
def test_bad_broker_url_names_file_and_field(tmp_path: Path, url: str, expected: str) -> None:
    message = load_error(tmp_path, MINIMAL.replace("mqtt://127.0.0.1:1883", url))
    assert message.startswith(f"{tmp_path / 'agent.yaml'}: broker.url: ")
    assert expected in message


@pytest.mark.parametrize(
    ("broker_extra", "expected"),
    [
        ("  password: a\n  password_file: pw\n", "password or password_file, not both"),
        ("  client_cert: c\n", "client_cert and client_key go together"),
        ("  ca_file: ca.pem\n", "need TLS: use an mqtts:// URL"),
        ("  reconnect_min_s: 30\n  reconnect_max_s: 10\n", "reconnect_max_s (10) must be at least"),
        ("  keepalive_s: 1\n", "broker.keepalive_s: Input should be greater than or equal to 5"),
    ],
)
def test_inconsistent_broker_settings(tmp_path: Path, broker_extra: str, expected: str) -> None:
    message = load_error(tmp_path, MINIMAL.replace("1883\n", "1883\n" + broker_extra))
    assert message.startswith(f"{tmp_path / 'agent.yaml'}: broker")
    assert expected in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("runtime: podman\n", "runtime: Input should be 'docker' or 'process'"),
        ("restart: {base_s: 20, max_s: 10}\n", "restart: Value error, max_s (10.0) must be at least base_s"),
        ("heartbeat_s: 0\n", "heartbeat_s: Input should be greater than 0"),
        ("metrics_port: 70000\n", "metrics_port: Input should be less than or equal to 65535"),
        ("metrics_port: -1\n", "metrics_port: Input should be greater than or equal to 0"),
        ("health_start_period_s: -5\n", "health_start_period_s: Input should be greater than or equal to 0"),
        ("colour: blue\n", "colour: Extra inputs are not permitted"),
        ("registry_secrets: {site: {username: u}}\n", "registry_secrets.site: Value error, give exactly one"),
    ],
)
def test_field_errors_name_the_field(tmp_path: Path, extra: str, expected: str) -> None:
    message = load_error(tmp_path, MINIMAL + extra)
    assert f"{tmp_path / 'agent.yaml'}: {expected.replace('Value error, ', '')}" in message


def test_bad_device_id(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("pump-17", "Pump 17"))
    assert message.startswith(f"{tmp_path / 'agent.yaml'}: device_id: 'Pump 17' is not a valid name")


def test_missing_files_are_each_named(tmp_path: Path) -> None:
    text = MINIMAL.replace("mqtt://127.0.0.1:1883", "mqtts://h\n  ca_file: nope/ca.pem\n  password_file: pw")
    text += "registry_secrets: {site: {username: u, password_file: gone}}\n"
    message = load_error(tmp_path, text)
    assert message.splitlines() == [
        f"{tmp_path / 'agent.yaml'}: broker.password_file: no such file: {tmp_path / 'pw'}",
        f"{tmp_path / 'agent.yaml'}: broker.ca_file: no such file: {tmp_path / 'nope' / 'ca.pem'}",
        f"{tmp_path / 'agent.yaml'}: registry_secrets.site.password_file: no such file: {tmp_path / 'gone'}",
    ]


def test_missing_public_key_and_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder")
    message = load_error(tmp_path, MINIMAL.replace("cloud.pub", "other.pub"))
    assert f"cloud_public_key: no such file: {tmp_path / 'other.pub'}" in message
    assert f"state_dir: {tmp_path / 'state'} exists and is not a folder" in message


def test_images_dir_and_start_period_are_configurable(tmp_path: Path) -> None:
    text = MINIMAL + "images_dir: modules\nhealth_start_period_s: 300\nmetrics_port: 0\n"
    config = load_agent_config(write(tmp_path, text))
    assert config.images_dir == tmp_path / "modules"  # relative to the file, not to state_dir
    assert config.health_start_period_s == 300.0
    assert config.metrics_port == 0  # 0 = off, like leaving it out


def test_images_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "modules").write_text("not a folder")
    message = load_error(tmp_path, MINIMAL + "images_dir: modules\n")
    assert (
        message == f"{tmp_path / 'agent.yaml'}: images_dir: {tmp_path / 'modules'} exists and is not a folder"
    )


def test_a_missing_state_dir_is_the_only_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL.replace("state_dir: state\n", ""))
    assert message.splitlines() == [f"{tmp_path / 'agent.yaml'}: state_dir: Field required"]


def test_duplicate_key_and_unreadable_file(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL + "device_id: other\n")
    assert message == f"{tmp_path / 'agent.yaml'}:6: duplicate key 'device_id' in mapping (first on line 1)"
    with pytest.raises(DocumentError, match="cannot read"):
        load_agent_config(tmp_path / "absent.yaml")


def test_password_file_vanishing_later_is_a_clear_error(tmp_path: Path) -> None:
    broker = BrokerConfig(url="mqtt://h", password_file=tmp_path / "pw")
    with pytest.raises(DocumentError, match=f"{tmp_path / 'pw'}: cannot read"):
        broker.read_password()


def test_config_can_be_built_in_code() -> None:
    config = AgentConfig(
        device_id="sim-0001",
        broker=BrokerConfig(url="mqtt://[::1]:1884"),
        cloud_public_key=Path("/k.pub"),
        state_dir=Path("/tmp/s"),
    )
    assert (config.broker.host, config.broker.port) == ("::1", 1884)
    assert config.images_dir == Path("/tmp/s/images")
