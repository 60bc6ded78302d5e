"""Pure packaging logic: reproducible layers, image documents, build plans and Dockerfiles,
entry-script checks, requirement handling, registry error text, profiling arithmetic.

Files are written under tmp_path; nothing here talks to Docker Engine or a registry.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from cloud.inference_config import InferenceConfig
from cloud.packaging.base import inputs_hash, repository_path
from cloud.packaging.context import (
    LIB_ROOT,
    ModelInput,
    ModulePlan,
    layer_dir,
    make_plan,
    model_dir,
    module_info,
    render_dockerfile,
    runtime_entries,
    write_context,
)
from cloud.packaging.entry_check import check_entry_script
from cloud.packaging.errors import DiskFullError, EngineError, InputError, os_error
from cloud.packaging.image import BlobRef, RuntimeSettings, build_documents, manifest_for, timestamp
from cloud.packaging.layers import build_layer, expand_entries, image_path
from cloud.packaging.profiling import percentile, recommend
from cloud.packaging.progress import Silent, follow_engine_stream
from cloud.packaging.pydeps import (
    RUNTIME_REQUIREMENTS,
    canonical_name,
    merge_requirements,
    profile_requirements,
    prune_present,
    requirement_name,
)
from cloud.packaging.registry_client import RegistryClient, RegistryError, _describe, _Response
from modules.contract import DeviceProfile

REPO = Path(__file__).resolve().parents[2]
EPOCH = 315532800


def _profile(**base: object) -> DeviceProfile:
    return DeviceProfile.model_validate(
        {
            "name": "cpu",
            "description": "test",
            "base": {"image": "localhost:5000/edgedeploy/base-cpu:bookworm", "source": "debootstrap", **base},
            "backend": "onnxruntime",
            "onnxruntime": {"providers": [{"name": "CPUExecutionProvider"}]},
            "detect": {"always": True},
        }
    )


def _tar_members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.read_bytes()))) as tar:
        return tar.getmembers()


# ------------------------------------------------------------------------------------------ layers


def _tree(root: Path) -> Path:
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("a = 1\n")
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o700)
    return root


def test_layer_is_reproducible_and_normalised(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    first = build_layer([("/module/lib", src)], tmp_path / "1.tar.gz", EPOCH)
    os.utime(src / "pkg" / "a.py", (1, 1))
    os.chmod(src / "pkg" / "a.py", 0o600)
    second = build_layer([("module/lib/", src)], tmp_path / "2.tar.gz", EPOCH)
    assert (first.digest, first.diff_id, first.size) == (second.digest, second.diff_id, second.size)
    assert first.path.read_bytes() == second.path.read_bytes()

    members = _tar_members(first.path)
    assert [m.name for m in members] == [
        "module",
        "module/lib",
        "module/lib/pkg",
        "module/lib/pkg/a.py",
        "module/lib/run.sh",
    ]
    assert {m.mtime for m in members} == {EPOCH}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes["module/lib/pkg/a.py"] == 0o644
    assert modes["module/lib/run.sh"] == 0o755
    assert modes["module/lib"] == 0o755


def test_layer_changes_with_content_and_epoch(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    base = build_layer([("/x", src)], tmp_path / "1.tar.gz", EPOCH)
    other_epoch = build_layer([("/x", src)], tmp_path / "2.tar.gz", EPOCH + 1)
    (src / "pkg" / "a.py").write_text("a = 2\n")
    other_content = build_layer([("/x", src)], tmp_path / "3.tar.gz", EPOCH)
    assert len({base.digest, other_epoch.digest, other_content.digest}) == 3


def test_expand_entries_later_wins_and_skips_caches(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    replacement = tmp_path / "other.py"
    replacement.write_text("b = 2\n")
    files = expand_entries([("/m", src), ("/m/pkg/a.py", replacement)])
    assert {str(k): v for k, v in files.items()} == {
        "m/pkg/a.py": replacement,
        "m/run.sh": src / "run.sh",
    }


@pytest.mark.parametrize("bad", ["/", "../etc", "/module/../../etc", ""])
def test_image_path_rejects_escapes(bad: str) -> None:
    with pytest.raises(ValueError):
        image_path(bad)


# ------------------------------------------------------------------------------------------ images


def test_documents_are_canonical_and_merge_the_base() -> None:
    base_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin", "PYTHONPATH=/vendor"], "Cmd": ["python3"], "Labels": {"a": "1"}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
        "history": [{"created_by": "debootstrap"}],
    }
    layers = [
        BlobRef("sha256:" + "a" * 64, 10, "sha256:" + "1" * 64),
        BlobRef("sha256:" + "b" * 64, 20, "sha256:" + "2" * 64),
    ]
    settings = RuntimeSettings(
        env={"MODEL_DIR": "/module/models"}, cmd=("python3", "-m", "x"), labels={"b": "2"}
    )
    docs = build_documents(layers, settings, EPOCH, ["COPY models"], base_config)
    again = build_documents(layers, settings, EPOCH, ["COPY models"], base_config)
    assert docs.manifest_digest == again.manifest_digest
    config = json.loads(docs.config)
    assert config["created"] == "1980-01-01T00:00:00Z" == timestamp(EPOCH)
    assert config["config"]["Env"] == ["PATH=/usr/bin", "PYTHONPATH=/vendor", "MODEL_DIR=/module/models"]
    assert config["config"]["Cmd"] == ["python3", "-m", "x"]
    assert config["config"]["Labels"] == {"a": "1", "b": "2"}
    assert [h["created_by"] for h in config["history"]] == ["debootstrap", "COPY models"]
    assert [layer.digest for layer in docs.layers()] == [layer.digest for layer in layers]
    assert json.loads(docs.manifest)["config"]["digest"] == docs.config_digest
    assert manifest_for(docs.config, layers) == docs.manifest
    later = build_documents(layers, settings, EPOCH + 60, ["COPY models"], base_config)
    assert later.manifest_digest != docs.manifest_digest


def test_documents_need_one_history_line_per_new_layer() -> None:
    layer = BlobRef("sha256:" + "a" * 64, 1, "sha256:" + "1" * 64)
    with pytest.raises(ValueError, match="history"):
        build_documents([layer], RuntimeSettings(), EPOCH, [])


# ------------------------------------------------------------------------------------------ plans


def _model(tmp_path: Path, name: str = "digits", version: int = 3) -> ModelInput:
    folder = tmp_path / f"{name}-{version}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx bytes " + name.encode())
    return ModelInput(name, version, [("model.onnx", folder / "model.onnx")])


def _config(tmp_path: Path, **fields: object) -> InferenceConfig:
    config = InferenceConfig.model_validate(fields)
    config._base_dir = tmp_path
    return config


def _plan(
    tmp_path: Path, config: InferenceConfig, models: list[ModelInput], deps: Path | None = None
) -> ModulePlan:
    profile = _profile()
    info = module_info("digits", "3", "cpu", models, config)
    return make_plan(
        info,
        profile,
        models,
        config,
        base_from="127.0.0.1:5000/edgedeploy/base-cpu@sha256:" + "c" * 64,
        profile_files=[REPO / "device-profiles" / "cpu.yaml"],
        python_deps=deps,
        scratch=tmp_path / "scratch",
    )


def test_plan_orders_layers_and_puts_models_last(tmp_path: Path) -> None:
    (tmp_path / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return data\n")
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "feat.py").write_text("x = 1\n")
    deps = tmp_path / "deps"
    (deps / "extra").mkdir(parents=True)
    (deps / "extra" / "__init__.py").write_text("")
    config = _config(tmp_path, entry_script="score.py", source_files=["helpers"], env={"LOG_LEVEL": "DEBUG"})
    plan = _plan(tmp_path, config, [_model(tmp_path)], deps)
    assert [layer.name for layer in plan.layers] == ["python-deps", "runtime", "src", "models"]
    models_layer = {str(k) for k in expand_entries(plan.layers[-1].entries)}
    assert models_layer == {"module/models/digits/3/model.onnx", "module/module.json"}
    src_layer = {str(k) for k in expand_entries(plan.layers[2].entries)}
    assert src_layer == {"module/src/score.py", "module/src/helpers/feat.py"}
    env = plan.settings.env
    assert env["MODEL_DIR"] == env["AZUREML_MODEL_DIR"] == "/module/models/digits/3"
    assert env["ENTRY_SCRIPT"] == "/module/src/score.py"
    assert env["LOG_LEVEL"] == "DEBUG"
    assert plan.python_path == f"/module/runtime:{LIB_ROOT}"
    info = json.loads((tmp_path / "scratch" / "module.json").read_text())
    assert info["models"] == [{"name": "digits", "version": 3, "files": ["model.onnx"]}]
    assert info["entry_script"] == "score.py"


def test_plan_for_several_models_points_at_the_models_root(tmp_path: Path) -> None:
    models = [_model(tmp_path, "a", 1), _model(tmp_path, "b", 2)]
    assert model_dir(models) == "/module/models"
    plan = _plan(tmp_path, _config(tmp_path), models)
    assert [layer.name for layer in plan.layers] == ["runtime", "models"]
    assert "ENTRY_SCRIPT" not in plan.settings.env


def test_plan_refuses_env_the_packager_sets(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="PYTHONPATH"):
        _plan(tmp_path, _config(tmp_path, env={"PYTHONPATH": "/x"}), [_model(tmp_path)])


def test_runtime_layer_holds_the_scoring_package_only() -> None:
    paths = {dest for dest, _ in runtime_entries()}
    assert "/module/runtime/modules/contract.py" in paths
    assert "/module/runtime/modules/scoring/__main__.py" in paths
    assert not any("/examples/" in p or p.endswith(".pyc") or "__pycache__" in p for p in paths)


def test_dockerfile_copies_layers_in_order_and_quotes_values(tmp_path: Path) -> None:
    config = _config(tmp_path, env={"GREETING": 'say "hi" for $5'})
    plan = _plan(tmp_path, config, [_model(tmp_path)])
    text = render_dockerfile(plan)
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("FROM ")] == [f"FROM {plan.base_from}"]
    copies = [ln for ln in lines if ln.startswith("COPY ")]
    assert copies == [f"COPY {layer_dir(i, layer)}/ /" for i, layer in enumerate(plan.layers, 1)]
    assert copies[-1] == "COPY layers/2-models/ /"
    assert 'GREETING="say \\"hi\\" for \\$5"' in text
    assert 'PYTHONPATH="/module/runtime${PYTHONPATH:+:$PYTHONPATH}"' in text
    assert lines[-1] == 'CMD ["python3", "-m", "modules.scoring"]'
    assert "EXPOSE 5001" in lines


def test_context_has_every_file_at_the_fixed_time(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _config(tmp_path), [_model(tmp_path)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    dockerfile = write_context(plan, out, EPOCH)
    assert dockerfile == out / "Dockerfile"
    assert not (out / "stale.txt").exists()
    assert (out / "layers/2-models/module/models/digits/3/model.onnx").read_bytes() == b"onnx bytes digits"
    assert (out / "layers/1-runtime/module/profiles/cpu.yaml").is_file()
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            assert os.lstat(Path(dirpath) / name).st_mtime == EPOCH, name


# ------------------------------------------------------------------------------------ entry scripts


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def run(data):\n    return data\n", "no top-level init()"),
        ("def init():\n    pass\n", "no top-level run()"),
        ("x = 1\n", "no top-level init() or run()"),
        ("def init():\n    pass\n\ndef run(:\n", ":4: syntax error"),
        ("def init(model):\n    pass\n\ndef run(data):\n    pass\n", ":1: init() must take no required"),
        ("def init():\n    pass\n\ndef run():\n    pass\n", ":4: run() takes no arguments"),
        ("def init():\n    pass\n\nclass run:\n    pass\n", ":4: run is a class"),
    ],
)
def test_entry_script_problems_are_named(tmp_path: Path, source: str, message: str) -> None:
    script = tmp_path / "score.py"
    script.write_text(source)
    with pytest.raises(InputError) as err:
        check_entry_script(script)
    assert message in str(err.value)
    assert str(script) in str(err.value)


@pytest.mark.parametrize(
    "source",
    [
        "def init():\n    pass\n\ndef run(data):\n    return data\n",
        "async def init():\n    pass\n\nasync def run(*args, **kw):\n    return 1\n",
        "from impl import init, run\n",
        "def init(config=None):\n    pass\n\nrun = lambda data: data\n",
    ],
)
def test_good_entry_scripts_pass(tmp_path: Path, source: str) -> None:
    script = tmp_path / "score.py"
    script.write_text(source)
    check_entry_script(script)


# ------------------------------------------------------------------------------------ requirements


def test_runtime_requirements_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert sorted(RUNTIME_REQUIREMENTS) == sorted(project["dependencies"])


def test_requirement_names_and_merging() -> None:
    assert requirement_name("PyYAML>=6.0") == "pyyaml"
    assert requirement_name("onnxruntime-gpu[cuda,cudnn]==1.31.1") == "onnxruntime-gpu"
    assert canonical_name("typing_extensions") == "typing-extensions"
    assert merge_requirements(["numpy>=1.24", "aiohttp"], ["NumPy==2.4.6"]) == ["aiohttp", "NumPy==2.4.6"]
    for bad in ("--index-url http://x", "./wheel.whl", "https://x/y.whl", ""):
        with pytest.raises(InputError):
            requirement_name(bad)


def test_profile_requirements_swap_onnxruntime_for_the_profiles_build() -> None:
    gpu = _profile(python_packages=["onnxruntime-gpu[cuda]==1.31.1"]).model_copy(
        update={"onnxruntime": _profile().onnxruntime.model_copy(update={"package": "onnxruntime-gpu"})}  # type: ignore[union-attr]
    )
    names = [requirement_name(r) for r in profile_requirements(gpu)]
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    cpu = profile_requirements(_profile(python_packages=["numpy==2.4.6"]))
    assert "numpy==2.4.6" in cpu and "aiohttp>=3.9" in cpu


def test_prune_drops_what_the_base_has_at_the_same_version(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for name, version, files in (("numpy", "2.4.6", ["numpy/__init__.py"]), ("extra", "1.0", ["extra.py"])):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        for rel in files:
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).write_text("")
        record = [f"{rel},," for rel in files] + [f"{info.name}/RECORD,,"]
        (info / "RECORD").write_text("\n".join(record) + "\n")
    assert prune_present(site, {"numpy": "2.4.6", "extra": "0.9"}) == ["numpy"]
    assert sorted(p.name for p in site.iterdir()) == ["extra-1.0.dist-info", "extra.py"]


def test_base_inputs_hash_follows_the_base_section() -> None:
    one = inputs_hash(_profile(python_packages=["numpy==2.4.6"]))
    assert one == inputs_hash(_profile(python_packages=["numpy==2.4.6"]))
    assert one != inputs_hash(_profile(python_packages=["numpy==2.4.5"]))
    assert one != inputs_hash(_profile(python_packages=["numpy==2.4.6"], apt_packages=["curl"]))
    assert repository_path("localhost:5000/edgedeploy/base-cpu:bookworm") == "edgedeploy/base-cpu"
    assert repository_path("nvcr.io/nvidia/cuda:12.2.0-runtime") == "nvidia/cuda"
    assert repository_path("edgedeploy/base-cpu") == "edgedeploy/base-cpu"


# ------------------------------------------------------------------------------------ errors, misc


def test_registry_errors_carry_the_registrys_words() -> None:
    body = json.dumps({"errors": [{"code": "UNSUPPORTED", "message": "read-only mode"}]}).encode()
    assert _describe(_Response(405, {}, body)) == "HTTP 405 UNSUPPORTED: read-only mode"
    assert _describe(_Response(502, {}, b"<html>bad gateway</html>\n")) == "HTTP 502 <html>bad gateway</html>"
    with pytest.raises(RegistryError, match="without a scheme"):
        RegistryClient("http://127.0.0.1:5000")
    assert not RegistryClient("127.0.0.1:5000").secure
    assert not RegistryClient("localhost:5000").secure
    assert RegistryClient("registry.example.com").secure


def test_engine_stream_errors_become_one_line() -> None:
    events = [{"status": "Loading layer", "id": "abc", "progressDetail": {"current": 1, "total": 2}}]
    assert len(follow_engine_stream(events, Silent(), "load")) == 1
    with pytest.raises(EngineError, match="docker load failed: no space left on device"):
        follow_engine_stream([{"errorDetail": {"message": "no space left on device"}}], Silent(), "load")


def test_full_disk_is_named() -> None:
    err = os_error(OSError(errno.ENOSPC, "No space left on device", "/cache/x"), "writing layer x")
    assert isinstance(err, DiskFullError)
    assert str(err) == "no space left on device while writing layer x: free some space and retry"


def test_percentiles_and_recommendation() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert recommend(0.1, 30.0) == (0.25, 64)
    assert recommend(0.9, 100.0) == (1.25, 160)
