"""Inference config files: validation messages name the file and field; secrets never print."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.inference_config import InferenceConfig, InferenceConfigError, load_inference_config

FULL = """\
entry_script: score.py
source_files: [features.py, labels]
requirements: ["scikit-learn==1.5.2", "numpy>=1.24"]
env: {LOG_LEVEL: info}
input_sample_file: samples/input.json
output_sample: [0, 1]
base_image: 127.0.0.1:5000/edge/base-cpu:1
registry:
  address: 127.0.0.1:5000
  username: builder
  password_env: TEST_REGISTRY_PASSWORD
"""


def write(folder: Path, text: str, name: str = "inference.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "score.py").write_text("def init(): pass\ndef run(data): return data\n")
    (tmp_path / "features.py").write_text("")
    (tmp_path / "labels").mkdir()
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "input.json").write_text('{"data": [[5.1, 3.5, 1.4, 0.2]]}')
    return tmp_path


def test_full_config_loads_with_paths_relative_to_the_file(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    cfg = load_inference_config(write(project, FULL))
    assert cfg.path(cfg.entry_script or "") == project / "score.py"
    assert cfg.samples() == ({"data": [[5.1, 3.5, 1.4, 0.2]]}, [0, 1])
    assert cfg.requirements == ["scikit-learn==1.5.2", "numpy>=1.24"]
    assert cfg.base_image == "127.0.0.1:5000/edge/base-cpu:1"


def test_credentials_come_from_the_environment_and_never_print(project: Path) -> None:
    cfg = load_inference_config(write(project, FULL))
    creds = cfg.credentials({"TEST_REGISTRY_PASSWORD": "s3cret-pw"})
    assert creds is not None
    assert creds.password.get_secret_value() == "s3cret-pw"
    for shown in (repr(creds), str(creds), creds.redacted(), creds.model_dump_json(), repr(cfg)):
        assert "s3cret-pw" not in shown
    assert creds.redacted() == "builder:****@127.0.0.1:5000"
    with pytest.raises(
        InferenceConfigError, match=r"registry\.password_env: environment variable TEST_REGISTRY"
    ):
        cfg.credentials({})


def test_credentials_from_a_file(project: Path) -> None:
    (project / "pw").write_text("from-file\n")
    cfg = load_inference_config(
        write(project, "registry: {address: reg.example.com, username_env: REG_USER, password_file: pw}\n")
    )
    creds = cfg.credentials({"REG_USER": "robot"})
    assert creds is not None
    assert (creds.username, creds.password.get_secret_value()) == ("robot", "from-file")
    (project / "pw").write_text("")
    with pytest.raises(InferenceConfigError, match=r"registry\.password_file: .*pw is empty"):
        cfg.credentials({"REG_USER": "robot"})


def test_an_inline_password_is_refused(project: Path) -> None:
    path = write(project, "registry: {address: reg.example.com, username: u, password: hunter2}\n")
    with pytest.raises(InferenceConfigError) as err:
        load_inference_config(path)
    assert str(err.value).startswith(f"{path}: registry: do not write the registry password in the config")
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("entry_script: /abs/score.py\n", "entry_script: '/abs/score.py' must be a path relative"),
        ("entry_script: score.sh\n", "entry_script: 'score.sh' must be a Python file"),
        ("source_files: [../up.py]\n", "source_files: '../up.py' must be a path relative"),
        ("requirements: ['--index-url http://x']\n", "requirements: item 0: pip options"),
        ("requirements: ['numpy>=>1']\n", "requirements: item 0: 'numpy>=>1' is not a valid pip requirement"),
        ("env: {MODEL_DIR: /x}\n", "env: MODEL_DIR is set by the module runtime"),
        ("env: {'1BAD': x}\n", "env: '1BAD' is not a valid environment variable name"),
        ("base_image: 'Not An Image'\n", "base_image: 'Not An Image' is not a valid image reference"),
        ("input_sample: 1\ninput_sample_file: samples/input.json\n", "(document): give input_sample or"),
        (
            "registry: {address: 'bad address', username: u, password_env: P}\n",
            "registry.address: 'bad address'",
        ),
        ("registry: {address: r.example.com, username: u}\n", "registry: give exactly one of password_env"),
        ("unknown_field: 1\n", "unknown_field: Extra inputs are not permitted"),
        ("- a list\n", "expected a mapping at the top level, got list"),
        ("", "the document is empty"),
    ],
)
def test_errors_name_the_file_and_field(project: Path, text: str, expected: str) -> None:
    path = write(project, text)
    with pytest.raises(InferenceConfigError) as err:
        load_inference_config(path)
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"{path}: ")
    assert expected in first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("env: {A: [unclosed\n", ":2: while parsing a flow sequence"),
        ("entry_script: score.py\nenv: {}\nentry_script: other.py\n", ":3: duplicate key 'entry_script'"),
    ],
)
def test_yaml_errors_name_the_line(project: Path, text: str, expected: str) -> None:
    path = write(project, text)
    with pytest.raises(InferenceConfigError) as err:
        load_inference_config(path)
    assert str(err.value).startswith(f"{path}{expected}")


def test_missing_files_are_listed_per_field(project: Path) -> None:
    path = write(project, "entry_script: nope.py\nsource_files: [features.py, gone]\n")
    with pytest.raises(InferenceConfigError) as err:
        load_inference_config(path)
    assert str(err.value).splitlines() == [
        f"{path}: entry_script: {project / 'nope.py'} does not exist",
        f"{path}: source_files.1: {project / 'gone'} does not exist",
    ]


def test_unreadable_or_bad_sample_file(project: Path) -> None:
    (project / "samples" / "input.json").write_text("{not json")
    cfg = load_inference_config(write(project, "input_sample_file: samples/input.json\n"))
    with pytest.raises(
        InferenceConfigError, match=r"input_sample_file: .*input\.json:1: Expecting property name"
    ):
        cfg.samples()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InferenceConfigError, match=f"{tmp_path / 'absent.yaml'}: cannot read"):
        load_inference_config(tmp_path / "absent.yaml")


def test_entry_script_is_optional_only_for_onnx() -> None:
    no_script = InferenceConfig()
    no_script.check_entry_script([("digits", "onnx")])
    with pytest.raises(
        InferenceConfigError, match=r"entry_script: required because iris \(sklearn\) is not ONNX"
    ):
        no_script.check_entry_script([("digits", "onnx"), ("iris", "sklearn")])
    InferenceConfig(entry_script="score.py").check_entry_script([("iris", "sklearn")])


def test_minimal_config_has_no_samples_or_credentials(tmp_path: Path) -> None:
    cfg = load_inference_config(write(tmp_path, "env: {}\n"))
    assert cfg.entry_script is None
    assert cfg.samples() == (None, None)
    assert cfg.credentials() is None
