"""RabbitMQ definitions from the fleet's access rules: keys, patterns and who is left out."""

from __future__ import annotations

import re

from cloud.broker_rabbitmq import binding_key, key_pattern, left_out_reason, routing_key_topic


def test_routing_keys_map_back_to_topics() -> None:
    # RabbitMQ's MQTT plugin swaps '/' and '.' between topics and routing keys.
    assert routing_key_topic("edge.cam-1.reported") == "edge/cam-1/reported"
    assert routing_key_topic("edge.cam-1.cmd.res.ab12") == "edge/cam-1/cmd/res/ab12"
    assert routing_key_topic("edge.v1/2.reported") == "edge/v1.2/reported"


def test_binding_keys_and_permission_patterns() -> None:
    assert binding_key("edge/+/reported") == "edge.*.reported"
    own = re.compile("^" + key_pattern("edge/{username}/reported").replace("{username}", "cam-1") + "$")
    assert own.match("edge.cam-1.reported") and not own.match("edge.cam-2.reported")
    assert re.fullmatch(key_pattern("edge/+/cmd/req/#"), "edge.cam-1.cmd.req.x1")
    assert not re.fullmatch(key_pattern("edge/+/reported"), "edge.a.b.reported")


def test_devices_rabbitmq_cannot_serve_are_left_out_with_the_reason() -> None:
    assert left_out_reason("cam-1", "hash") is None
    assert "remove and add it again" in (left_out_reason("cam-1", None) or "")
    assert "'.'" in (left_out_reason("cam.1", "hash") or "")
