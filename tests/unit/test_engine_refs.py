"""How image references are split for Docker Engine's pull and tag calls (a recording fake API)."""

from __future__ import annotations

from typing import Any

import pytest

from cloud.packaging import engine
from cloud.packaging.errors import EngineError
from cloud.packaging.progress import Silent

DIGEST = "sha256:" + "a" * 64


class RecordingApi:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def pull(
        self, repository: str, tag: str, stream: bool, decode: bool, auth_config: object = None
    ) -> list[dict[str, str]]:
        self.calls.append(("pull", repository, tag))
        return []

    def tag(self, image: str, repository: str, tag: str, force: bool) -> bool:
        self.calls.append(("tag", image, repository, tag))
        return True


class RecordingClient:
    def __init__(self) -> None:
        self.api = RecordingApi()


@pytest.mark.parametrize(
    ("ref", "repository", "tag"),
    [
        ("localhost:5000/edge/base:1.2", "localhost:5000/edge/base", "1.2"),
        ("localhost:5000/edge/base", "localhost:5000/edge/base", "latest"),  # a port is not a tag
        (f"localhost:5000/edge/base@{DIGEST}", "localhost:5000/edge/base", DIGEST),
        (f"localhost:5000/edge/base:1.2@{DIGEST}", "localhost:5000/edge/base", DIGEST),  # the digest wins
    ],
)
def test_pull_splits_the_reference(ref: str, repository: str, tag: str) -> None:
    client = RecordingClient()
    engine.pull(client, ref, Silent())
    assert client.api.calls == [("pull", repository, tag)]


def test_tag_splits_the_reference_and_refuses_digests_and_bad_names() -> None:
    client = RecordingClient()
    engine.tag(client, "sha256:cfg", "localhost:5000/edge/app:7")
    engine.tag(client, "sha256:cfg", "localhost:5000/edge/app")
    assert client.api.calls == [
        ("tag", "sha256:cfg", "localhost:5000/edge/app", "7"),
        ("tag", "sha256:cfg", "localhost:5000/edge/app", "latest"),
    ]
    with pytest.raises(EngineError, match="a tag cannot name a digest"):
        engine.tag(client, "sha256:cfg", f"localhost:5000/edge/app@{DIGEST}")
    with pytest.raises(EngineError, match="'Edge/App:1' is not a valid image reference"):
        engine.pull(client, "Edge/App:1", Silent())
