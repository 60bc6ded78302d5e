"""Mosquitto password, ACL and configuration files as ``cloud.broker`` writes them (no broker here).

The compatibility of the hashes with the real ``mosquitto_passwd`` and broker is checked in
``tests/integration/test_broker_acl.py``; here a line ``mosquitto_passwd`` 2.0.11 wrote serves as
a known vector.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cloud import broker

# Written by `mosquitto_passwd -c -b pw alice secret` (mosquitto 2.0.11).
MOSQUITTO_LINE = (
    "alice:$7$101$caeHGml/HEt93N/w$HgUdAV4qKeKmV3+rO09pdlQHVGFG3drMm26DPeFMMrc0z5u6dm5pBwpDZztx6PL7"
    "ePC32RBeJ4karsGRfHdXhQ=="
)


def test_hash_reproduces_a_mosquitto_passwd_line() -> None:
    encoded = broker.parse_password_file(MOSQUITTO_LINE)["alice"]
    iterations, salt, digest = broker.parse_hash(encoded)
    assert (iterations, len(salt), len(digest)) == (101, 12, 64)
    assert broker.hash_password("secret", iterations=iterations, salt=salt) == encoded
    assert broker.verify_password("secret", encoded)
    assert not broker.verify_password("Secret", encoded)


def test_fresh_hashes_have_mosquitto_shape_and_random_salts() -> None:
    a, b = broker.hash_password("pw"), broker.hash_password("pw")
    assert a != b
    for encoded in (a, b):
        prefix, iterations, salt, digest = encoded.removeprefix("$").split("$")
        assert (prefix, iterations, len(salt), len(digest)) == ("7", "101", 16, 88)
        assert broker.verify_password("pw", encoded)


@pytest.mark.parametrize(
    ("encoded", "problem"),
    [
        ("$6$101$abc$def", "not a mosquitto PBKDF2-SHA512 hash"),
        ("$7$x$caeHGml/HEt93N/w$AAAA", "bad iteration count 'x'"),
        ("$7$0$caeHGml/HEt93N/w$AAAA", "bad iteration count '0'"),
        ("$7$101$not base64!$AAAA", "not base64"),
        ("$7$101$caeHGml/HEt93N/w$AAAA", "hash has 3 bytes"),
        ("plaintext", "not a mosquitto PBKDF2-SHA512 hash"),
    ],
)
def test_malformed_hashes_are_named(encoded: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        broker.parse_hash(encoded)


def test_password_file_is_sorted_and_round_trips() -> None:
    hashes = {"pump-2": broker.hash_password("b"), "pump-1": broker.hash_password("a")}
    text = broker.render_password_file(hashes)
    assert [line.split(":")[0] for line in text.splitlines()] == ["pump-1", "pump-2"]
    assert broker.parse_password_file("# comment\n\n" + text) == hashes


@pytest.mark.parametrize("user", ["a:b", "", " x", "a\nb"])
def test_password_file_refuses_impossible_usernames(user: str) -> None:
    with pytest.raises(ValueError, match="cannot be a Mosquitto username"):
        broker.render_password_file({user: broker.hash_password("x")})


def test_password_file_line_without_colon_is_an_error() -> None:
    with pytest.raises(ValueError, match="line 2: expected user:hash"):
        broker.parse_password_file(MOSQUITTO_LINE + "\nbroken\n")


def test_acl_gives_devices_only_their_own_topics_and_the_cloud_its_own() -> None:
    lines = [line for line in broker.render_acl("_cloud").splitlines() if line and not line.startswith("#")]
    assert lines == [
        "pattern read edge/%u/desired",
        "pattern read edge/%u/cmd/req/#",
        "pattern write edge/%u/reported",
        "pattern write edge/%u/heartbeat",
        "pattern readwrite edge/%u/online",
        "pattern write edge/%u/cmd/res/#",
        "user _cloud",
        "topic write edge/+/desired",
        "topic write edge/+/cmd/req/#",
        "topic readwrite edge/+/reported",
        "topic read $share/cloud/edge/+/reported",
        "topic read edge/+/heartbeat",
        "topic read $share/cloud/edge/+/heartbeat",
        "topic readwrite edge/+/online",
        "topic read edge/+/cmd/res/#",
    ]


def _conf(listener: broker.ListenerOptions, user: str = "edge") -> list[str]:
    text = broker.render_mosquitto_conf(
        listener,
        cloud_port=1999,
        password_file=Path("/d/broker/passwd"),
        acl_file=Path("/d/broker/acl"),
        persistence_dir=Path("/etc/mq/data"),
        pid_file=Path("/etc/mq/mosquitto.pid"),
        user=user,
    )
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_plain_config_listens_on_loopback_without_anonymous_access() -> None:
    lines = _conf(broker.ListenerOptions())
    for expected in (
        "allow_anonymous false",
        "password_file /d/broker/passwd",
        "acl_file /d/broker/acl",
        "persistence true",
        "persistence_location /etc/mq/data/",
        "pid_file /etc/mq/mosquitto.pid",
    ):
        assert expected in lines
    assert "user edge" in lines
    devices = lines.index("listener 1883 127.0.0.1")
    assert lines[devices + 1] == "use_username_as_clientid true"  # no device can take another's id
    assert lines[-1] == "listener 1999 127.0.0.1"  # the cloud's workers: their own client ids
    assert not any(line.startswith("certfile") for line in lines)


def test_tls_config_names_certificate_key_and_ca() -> None:
    listener = broker.ListenerOptions(
        port=8883,
        bind="0.0.0.0",
        tls_cert=Path("/tls/server.pem"),
        tls_key=Path("/tls/server.key"),
        ca_file=Path("/tls/ca.pem"),
    )
    lines = _conf(listener, user="mosquitto")
    assert "user mosquitto" in lines
    at = lines.index("listener 8883 0.0.0.0")
    assert lines[at + 1 :] == [
        "use_username_as_clientid true",
        "certfile /tls/server.pem",
        "keyfile /tls/server.key",
        "tls_version tlsv1.2",
        "cafile /tls/ca.pem",
        "listener 1999 127.0.0.1",
    ]


@pytest.mark.parametrize(
    ("listener", "url"),
    [
        (broker.ListenerOptions(), "mqtt://127.0.0.1:1883"),
        (broker.ListenerOptions(port=1884, bind="0.0.0.0"), "mqtt://localhost:1884"),
        (broker.ListenerOptions(bind="::1"), "mqtt://[::1]:1883"),
        (broker.ListenerOptions(port=8883, tls_cert=Path("c"), tls_key=Path("k")), "mqtts://127.0.0.1:8883"),
    ],
)
def test_listener_url(listener: broker.ListenerOptions, url: str) -> None:
    assert broker.listener_url(listener) == url


def test_files_on_disk_include_the_cloud_user_with_a_stable_hash(tmp_path: Path) -> None:
    paths = broker.BrokerPaths.of(tmp_path)
    device_hash = broker.hash_password("device-pw")
    broker.write_broker_files(paths, {"pump-1": device_hash})
    first = broker.parse_password_file(paths.password_file.read_text())
    user, password = broker.cloud_credentials(paths)
    assert user == broker.CLOUD_USER
    assert set(first) == {"pump-1", user}
    assert first["pump-1"] == device_hash
    assert broker.verify_password(password, first[user])
    assert stat.S_IMODE(paths.cloud_password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.password_file.stat().st_mode) == 0o640

    broker.write_broker_files(paths, {})
    second = broker.parse_password_file(paths.password_file.read_text())
    assert second == {user: first[user]}  # the device is gone, the cloud's hash is kept
    assert paths.acl_file.read_text() == broker.render_acl()


def test_a_device_cannot_take_the_cloud_username(tmp_path: Path) -> None:
    with pytest.raises(broker.BrokerError, match="cloud's username"):
        broker.write_broker_files(
            broker.BrokerPaths.of(tmp_path), {broker.CLOUD_USER: broker.hash_password("x")}
        )


def test_settings_round_trip_and_bad_file_is_named(tmp_path: Path) -> None:
    paths = broker.BrokerPaths.of(tmp_path)
    assert broker.load_settings(paths) is None
    settings = broker.BrokerSettings(url="mqtt://127.0.0.1:1884", pid_file=tmp_path / "m.pid")
    broker.save_settings(paths, settings)
    assert broker.load_settings(paths) == settings
    paths.settings_file.write_text('{"url": 3}')
    with pytest.raises(broker.BrokerError, match=r"broker\.json: url: "):
        broker.load_settings(paths)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "does not exist"), ("abc", "holds 'abc', not a process id"), ("", "holds ''")],
)
def test_reload_reports_a_bad_pid_file(tmp_path: Path, content: str | None, problem: str) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    if content is not None:
        pid_file.write_text(content)
    with pytest.raises(broker.BrokerError, match=problem):
        broker.reload_broker(pid_file)


def test_reload_of_an_exited_process_is_an_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(done.stdout)
    with pytest.raises(broker.BrokerError, match="which is not running"):
        broker.reload_broker(pid_file)


def test_reload_sends_sighup(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # SIGHUP is blocked before 'ready' and taken with sigwait: no handler runs inside a
            # print, so the signal cannot land in the middle of a write (no reentrant-call race).
            "import signal\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})\n"
            "print('ready', flush=True)\n"
            "signal.sigwait({signal.SIGHUP})\n"
            "print('HUP', flush=True)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        pid_file = tmp_path / "mosquitto.pid"
        pid_file.write_text(f"{child.pid}\n")
        assert broker.reload_broker(pid_file) == child.pid
        assert child.stdout.readline() == "HUP\n"
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
