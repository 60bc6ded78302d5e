"""What the Docker runtime reports as a module's image digest."""

from __future__ import annotations

from agent.runtime.docker import _loaded_digests, _repo_digest


def test_an_image_the_agent_loaded_reports_the_manifest_digest_it_verified() -> None:
    hexa = "f70c53ed8a9d14053ff1119fe27ab4585ffc3a68775c3718f81c1073f222221c"
    image = f"127.0.0.1:5000/digits@sha256:{hexa}"
    tags = [f"127.0.0.1:5000/digits:sha256-{hexa}", "127.0.0.1:5000/digits:latest"]
    assert _repo_digest(image, _loaded_digests(tags)) == f"sha256:{hexa}"
    assert _repo_digest(image, _loaded_digests(["other/repo:sha256-" + hexa])) is None
    assert _loaded_digests(["127.0.0.1:5000/digits:sha256-short"]) == []
