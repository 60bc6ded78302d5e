"""``edgectl model ...`` through ``cloud.cli.main``: exit codes, JSON on stdout, one-line errors."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from cloud.cli import main
from cloud.config import resolve_settings
from cloud.store import Registry
from cloud.store import blobs as blobs_module
from cloud.store.deployments import set_deployment_models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("EDGE_DATA_DIR", str(d))
    monkeypatch.delenv("EDGE_DB_URL", raising=False)
    return d


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "digits"
    d.mkdir()
    (d / "model.onnx").write_bytes(bytes(range(256)) * 64)
    (d / "labels.json").write_text('["0","1","2"]')
    return d


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_register_prints_the_new_version(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    code, out, err = run(capsys, "model", "register", str(model_dir), "--name", "digits")
    assert (code, err) == (0, "")
    assert out == "registered digits:1 (onnx, 2 files, 16.0 KiB)\n"


def test_register_json_lists_files_with_hashes(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    v = run_json(
        capsys,
        "model",
        "register",
        str(model_dir),
        "--name",
        "digits",
        "--tag",
        "stage=dev",
        "--description",
        "d",
    )
    assert (v["name"], v["version"], v["tags"], v["description"]) == ("digits", 1, {"stage": "dev"}, "d")
    assert {f["path"]: f["sha256"] for f in v["files"]} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir()
    }
    again = run_json(capsys, "model", "register", str(model_dir / "model.onnx"), "--name", "digits")
    assert again["version"] == 2


def test_registering_the_same_files_again_says_so_and_if_changed_skips_it(
    capsys: pytest.CaptureFixture[str], model_dir: Path
) -> None:
    assert run(capsys, "model", "register", str(model_dir), "--name", "digits")[0] == 0
    code, out, err = run(capsys, "model", "register", str(model_dir), "--name", "digits")
    assert (code, out) == (0, "registered digits:2 (onnx, 2 files, 16.0 KiB)\n")
    assert (
        err
        == "note: the files are identical to digits:1; use --if-changed to register only when they differ\n"
    )
    code, out, err = run(capsys, "model", "register", str(model_dir), "--name", "digits", "--if-changed")
    assert (code, err) == (0, "")
    assert out == "digits:2 unchanged: its files are identical, nothing registered (--if-changed)\n"
    skipped = run_json(capsys, "model", "register", str(model_dir), "--name", "digits", "--if-changed")
    assert (skipped["version"], skipped["created"], skipped["identical_to"]) == (2, False, 2)
    (model_dir / "model.onnx").write_bytes(b"changed")
    changed = run_json(capsys, "model", "register", str(model_dir), "--name", "digits", "--if-changed")
    assert (changed["version"], changed["created"], changed["identical_to"]) == (3, True, None)


def test_identical_bytes_are_stored_once(
    capsys: pytest.CaptureFixture[str], model_dir: Path, data_dir: Path
) -> None:
    for name in ("a", "b"):
        assert run(capsys, "model", "register", str(model_dir), "--name", name)[0] == 0
    stored = [p for p in (data_dir / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert len(stored) == 2


def test_list_show_download_delete(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path
) -> None:
    run(capsys, "model", "register", str(model_dir), "--name", "digits", "--tag", "stage=prod")
    run(capsys, "model", "register", str(model_dir / "model.onnx"), "--name", "digits")

    listed = run_json(capsys, "model", "list")
    assert [(v["name"], v["version"], v["file_count"]) for v in listed] == [
        ("digits", 1, 2),
        ("digits", 2, 1),
    ]
    assert [v["version"] for v in run_json(capsys, "model", "list", "--tag", "stage=prod")] == [1]
    code, out, _ = run(capsys, "model", "list")
    assert out.splitlines()[0].split() == ["NAME", "VERSION", "FRAMEWORK", "FILES", "SIZE", "CREATED", "TAGS"]
    assert len(out.splitlines()) == 3

    shown = run_json(capsys, "model", "show", "digits:1")
    code, out, _ = run(capsys, "model", "show", "digits:1")
    assert code == 0
    for f in shown["files"]:
        assert f"{f['path']}  " in out and f["sha256"] in out and str(f["size"]) in out
    assert "deployments: -" in out
    assert run_json(capsys, "model", "show", "digits")["version"] == 2

    out_dir = tmp_path / "restored"
    result = run_json(capsys, "model", "download", "digits:1", "--out", str(out_dir))
    assert result["version"] == 1
    for p in model_dir.iterdir():
        assert (out_dir / p.name).read_bytes() == p.read_bytes()
    code, _, err = run(capsys, "model", "download", "digits:1", "--out", str(out_dir))
    assert code == 2
    assert err == f"edgectl: error: {out_dir / 'labels.json'} already exists (pass --force to overwrite)\n"
    assert run(capsys, "model", "download", "digits:1", "--out", str(out_dir), "--force")[0] == 0

    deleted = run_json(capsys, "model", "delete", "digits:1")
    assert deleted["versions"] == [1]
    assert deleted["blobs_removed"] == 1
    code, out, _ = run(capsys, "model", "delete", "digits", "--all")
    assert (code, out) == (0, "deleted digits:2 (freed 16.0 KiB in 1 blobs)\n")
    assert run_json(capsys, "model", "list") == []
    code, out, err = run(capsys, "model", "list")
    assert (code, out, err) == (0, "", "no model versions registered\n")


def test_delete_in_use_is_refused_with_the_deployment_name(
    capsys: pytest.CaptureFixture[str], model_dir: Path, data_dir: Path
) -> None:
    run(capsys, "model", "register", str(model_dir), "--name", "digits")
    registry = Registry.open(resolve_settings(data_dir, env={}))
    try:
        with registry.db.transaction() as s:
            set_deployment_models(s, "line-3-cameras", [("digits", 1)])
    finally:
        registry.close()
    code, out, err = run(capsys, "model", "delete", "digits:1")
    assert (code, out) == (2, "")
    assert err == (
        "edgectl: error: model digits:1 is used by deployment 'line-3-cameras'; "
        "remove it from the deployment first\n"
    )
    assert run_json(capsys, "model", "show", "digits:1")["deployments"] == ["line-3-cameras"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["register", "{model}", "--name", "my model"], "invalid model name: 'my model' is not a valid name"),
        (["register", "{missing}", "--name", "m"], "model path {missing} does not exist"),
        (["register", "{model}", "--name", "m", "--tag", "novalue"], "--tag 'novalue': expected KEY=VALUE"),
        (["register", "{model}", "--name", "m", "--tag", "a=1", "--tag", "a=2"], "--tag 'a' given twice"),
        (["show", "m:x"], "bad model reference 'm:x'"),
        (["show", "ghost"], "model 'ghost' is not registered"),
        (["download", "ghost:1", "--out", "{missing}"], "model 'ghost' is not registered"),
        (["delete", "m"], "give a version (m:VERSION) or --all"),
        (["delete", "m:1", "--all"], "--all deletes every version"),
        (["list", "--db-url", "mysql://root@h/db"], "unsupported database 'mysql'"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path, argv: list[str], message: str
) -> None:
    subst = {"{model}": str(model_dir), "{missing}": str(tmp_path / "missing")}
    code, out, err = run(capsys, "model", *[subst.get(a, a) for a in argv])
    assert (code, out) == (2, "")
    assert err.startswith("edgectl: error: ")
    assert err.count("\n") == 1
    assert message.replace("{missing}", str(tmp_path / "missing")) in err
    assert run_json(capsys, "model", "list") == []


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    code, _, err = run(capsys, "model", "register", str(model_dir))
    assert code == 2
    assert "the following arguments are required: --name" in err
    code, _, err = run(capsys, "model", "frobnicate")
    assert code == 2
    assert "invalid choice: 'frobnicate'" in err
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: edgectl" in err
    assert run(capsys, "--help")[0] == 0


def test_disk_full_rolls_back_and_exits_1(
    capsys: pytest.CaptureFixture[str], model_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(src: BinaryIO, dst: BinaryIO, progress: object = None) -> tuple[str, int]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobs_module, "copy_and_hash", no_space)
    code, out, err = run(capsys, "model", "register", str(model_dir), "--name", "digits")
    assert (code, out) == (1, "")
    assert (
        err
        == f"edgectl: error: disk full while storing {model_dir / 'labels.json'}: No space left on device\n"
    )
    monkeypatch.undo()
    monkeypatch.setenv("EDGE_DATA_DIR", str(data_dir))
    assert run_json(capsys, "model", "list") == []
    assert list((data_dir / "blobs" / "tmp").iterdir()) == []


def test_progress_goes_to_stderr_only_when_asked(capsys: pytest.CaptureFixture[str], model_dir: Path) -> None:
    code, out, err = run(capsys, "model", "register", str(model_dir), "--name", "a", "--json", "--progress")
    assert code == 0
    assert json.loads(out)["version"] == 1
    lines = err.splitlines()
    assert lines[-1] == "hashing model.onnx: 16.0 KiB / 16.0 KiB (100%)"
    assert all(line.startswith("hashing ") for line in lines)
    assert run(capsys, "model", "register", str(model_dir), "--name", "b")[2] == ""


def test_global_options_work_before_and_after_the_command(
    capsys: pytest.CaptureFixture[str], model_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    run(capsys, "--data-dir", str(other), "model", "register", str(model_dir), "--name", "x")
    assert [v["name"] for v in run_json(capsys, "model", "list", "--data-dir", str(other))] == ["x"]
    assert run_json(capsys, "model", "list") == []


def test_unexpected_errors_hide_the_traceback_unless_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Registry, "list_versions", boom)
    code, _, err = run(capsys, "model", "list")
    assert code == 1
    assert err == "edgectl: error: unexpected RuntimeError: boom (run with --debug for the traceback)\n"
    code, _, err = run(capsys, "--debug", "model", "list")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err


def test_runs_as_a_module(model_dir: Path, data_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloud.cli", "model", "register", str(model_dir), "--name", "m b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgectl: error: invalid model name: 'm b'")
