"""The MQTT layer's pure parts: the topic scheme (build, parse, ACL rules) and the URL parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.broker import render_acl
from edgemqtt import topics
from edgemqtt.endpoint import Address, Endpoint, parse_url


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        (topics.desired("cam-1"), topics.DeviceTopic("cam-1", "desired")),
        (topics.reported("cam-1"), topics.DeviceTopic("cam-1", "reported")),
        (topics.online("cam-1"), topics.DeviceTopic("cam-1", "online")),
        (topics.command_request("cam-1", "abc"), topics.DeviceTopic("cam-1", "cmd/req", "abc")),
        (topics.command_response("cam-1", "abc"), topics.DeviceTopic("cam-1", "cmd/res", "abc")),
    ],
)
def test_every_topic_built_parses_back(topic: str, parsed: topics.DeviceTopic) -> None:
    assert topics.parse(topic) == parsed


def test_the_scheme_is_spelled_as_the_design_says() -> None:
    assert topics.desired("d") == "edge/d/desired"
    assert topics.command_requests("d") == "edge/d/cmd/req/+"
    assert topics.shared(topics.ALL_REPORTED) == "$share/cloud/edge/+/reported"


@pytest.mark.parametrize(
    "topic",
    ["edge/d", "edge/d/desired/x", "other/d/desired", "edge//desired", "edge/+/desired", "edge/d/cmd/req"],
)
def test_foreign_topics_do_not_parse(topic: str) -> None:
    assert topics.parse(topic) is None


@pytest.mark.parametrize("device", ["", "a/b", "a+", "#", "a\0"])
def test_an_id_that_would_change_the_topic_s_shape_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match="cannot be a topic level"):
        topics.desired(device)
    with pytest.raises(ValueError, match="cannot be a topic level"):
        topics.command_request("d", device)


def test_acl_rules_write_the_device_as_the_broker_s_placeholder() -> None:
    mosquitto = [(r.access, r.topic) for r in topics.device_acl("%u")]
    assert ("read", "edge/%u/desired") in mosquitto
    assert ("write", "edge/%u/reported") in mosquitto
    assert not any("{device}" in t or "+" in t for _, t in mosquitto)
    rabbit = [r.topic for r in topics.device_acl("{username}")]
    assert "edge/{username}/cmd/res/#" in rabbit
    acl = render_acl()
    assert "pattern read edge/%u/desired\n" in acl and "topic read $share/cloud/edge/+/reported\n" in acl


def test_one_url_or_several_nodes() -> None:
    one = Endpoint.parse("mqtts://broker.example.com")
    assert one.addresses == (Address("broker.example.com", 8883, True),)
    nodes = Endpoint.parse("mqtt://a:1884, mqtt://b ,mqtt://[::1]:1999")
    assert [a.url for a in nodes.addresses] == ["mqtt://a:1884", "mqtt://b:1883", "mqtt://[::1]:1999"]
    assert nodes.url == "mqtt://a:1884,mqtt://b:1883,mqtt://[::1]:1999"
    assert Endpoint.parse(["mqtt://a", "mqtt://b"]).port == 1883


def test_credentials_come_from_the_urls_or_the_caller() -> None:
    ep = Endpoint.parse("mqtt://u%40x:p%3Aw@a,mqtt://u%40x:p%3Aw@b")
    assert (ep.username, ep.password) == ("u@x", "p:w")
    assert Endpoint.parse("mqtt://a", username="me", password="pw").username == "me"
    with pytest.raises(ValueError, match="different credentials"):
        Endpoint.parse("mqtt://u:1@a,mqtt://v:2@b")
    with pytest.raises(ValueError, match="not in the URL"):
        Endpoint.parse("mqtt://u:1@a", credentials_in_url=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "expected mqtt://host[:port] or mqtts://host[:port]"),
        ("mqtt://", "names no host"),
        ("mqtt://h:99999", "not a valid URL"),
        ("mqtt://h:0", "port 0"),
        ("mqtt://h/x", "no path, query or fragment"),
        ("", "no broker URL given"),
        (" , ", "no broker URL given"),
    ],
)
def test_a_bad_url_is_named_with_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Endpoint.parse(url)


def test_tls_files_that_cannot_load_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match=f"cannot load the broker's TLS files \\({bad}"):
        Endpoint.parse("mqtts://h", ca_file=bad).tls_context()


def test_parse_url_splits_one_url() -> None:
    parsed = parse_url("mqtt://user@h:1")
    assert (parsed.address, parsed.username, parsed.password) == (Address("h", 1, False), "user", None)
