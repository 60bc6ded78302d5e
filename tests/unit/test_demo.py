"""The demo's pure helpers: the registry access-log reader, sizes and tables."""

from __future__ import annotations

from pathlib import Path

from harness.demo import DemoOptions, DemoRun, _human, _table

DOCKER = "docker/20.10.24+dfsg1 go/go1.19.8 os/linux arch/amd64 UpstreamClient(docker-sdk-python/7.1.0)"
LOG = f'''\
- - [21/Nov/2026:02:11:10 +0000] "GET /v2/digits/manifests/sha256:b486 HTTP/1.1" 200 753 "" "{DOCKER}"
- - [21/Nov/2026:02:11:10 +0000] "GET /v2/digits/blobs/sha256:cd78 HTTP/1.1" 200 28000 "" "{DOCKER}"
- - [21/Nov/2026:02:11:10 +0000] "GET /v2/digits/blobs/sha256:b9d4 HTTP/1.1" 200 2400 "" "{DOCKER}"
- - [21/Nov/2026:02:11:10 +0000] "GET /v2/digits/blobs/sha256:dead HTTP/1.1" 404 157 "" "{DOCKER}"
- - [21/Nov/2026:02:11:10 +0000] "GET /v2/digits/manifests/sha256:95c4 HTTP/1.1" 200 753 "" ""
- - [21/Nov/2026:02:11:10 +0000] "HEAD /v2/digits/blobs/sha256:477a HTTP/1.1" 200 0 "" ""
time="2026-11-21T02:08:39Z" level=error msg="response completed with error" err.code="blob unknown"
'''


def test_pulls_are_docker_engine_gets_after_the_mark(tmp_path: Path) -> None:
    demo = DemoRun(DemoOptions(work=tmp_path))
    demo.logs.mkdir(parents=True)
    earlier = f'"GET /v2/digits/blobs/sha256:aaaa HTTP/1.1" 200 99999 "" "{DOCKER}"\n'
    (demo.logs / "registry.log").write_text(earlier + LOG)

    blobs, manifests = demo._pulled_since(len(earlier))

    assert blobs == {"sha256:cd78": 28000, "sha256:b9d4": 2400}
    assert manifests == 1


def test_human_sizes_are_decimal_like_the_packaging_output() -> None:
    assert [_human(n) for n in (999, 28000, 86_141_130, 3 * 10**9)] == [
        "999 B",
        "28.0 KB",
        "86.1 MB",
        "3.0 GB",
    ]


def test_table_pads_columns() -> None:
    assert _table(("A", "LONGER"), [("xyz", 1), ("q", 22)]) == ["A    LONGER", "xyz  1", "q    22"]
