"""Scoring server configuration from environment, module.json and flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modules.scoring.config import VARIABLES, ConfigError, load_config, parser


def _module(tmp_path: Path, **fields: object) -> Path:
    root = tmp_path / "module"
    (root / "src").mkdir(parents=True)
    (root / "src" / "score.py").write_text("def init(): pass\ndef run(data): return data\n")
    for model in fields.get("models", []):  # type: ignore[attr-defined]
        (root / "models" / model["name"] / str(model["version"])).mkdir(parents=True)
    path = root / "module.json"
    path.write_text(json.dumps({"name": "demo", **fields}))
    return path


def test_defaults_for_local_use(tmp_path: Path) -> None:
    script = tmp_path / "score.py"
    script.write_text("def init(): pass\ndef run(data): return data\n")
    config = load_config({"ENTRY_SCRIPT": str(script), "MODULE_JSON": str(tmp_path / "none.json")}, [])
    assert config.mode == "entry-script"
    assert (config.host, config.port, config.timeout_s) == ("127.0.0.1", 5001, 60.0)
    assert config.max_request_bytes == 16 * 1024 * 1024
    assert config.exit_on_init_failure is True
    assert config.log_access is False
    assert config.threads >= 1
    assert config.module_name == "score"


def test_module_json_implies_paths_and_listens_on_all_interfaces(tmp_path: Path) -> None:
    path = _module(
        tmp_path,
        version="7",
        profile="openvino-cpu",
        entry_script="score.py",
        models=[{"name": "digits", "version": 2}],
    )
    config = load_config({"MODULE_JSON": str(path)}, [])
    assert config.entry_script == path.parent / "src" / "score.py"
    assert config.model_dir == path.parent / "models" / "digits" / "2"
    assert (config.host, config.profile, config.module_name, config.module_version) == (
        "0.0.0.0",
        "openvino-cpu",
        "demo",
        "7",
    )


def test_several_models_use_the_models_root(tmp_path: Path) -> None:
    path = _module(tmp_path, models=[{"name": "a", "version": 1}, {"name": "b", "version": 1}])
    config = load_config({"MODULE_JSON": str(path)}, [])
    assert config.mode == "no-code"
    assert config.model_dir == path.parent / "models"


def test_flags_override_environment(tmp_path: Path) -> None:
    script = tmp_path / "score.py"
    script.write_text("")
    env = {"ENTRY_SCRIPT": str(script), "PORT": "6000", "MODULE_JSON": str(tmp_path / "x.json")}
    config = load_config(env, ["--port", "6001", "--threads", "3", "--log-access", "--timeout", "2.5"])
    assert (config.port, config.threads, config.log_access, config.timeout_s) == (6001, 3, True, 2.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "nothing to serve"),
        ({"ENTRY_SCRIPT": "/nonexistent/score.py"}, "ENTRY_SCRIPT: /nonexistent/score.py does not exist"),
        ({"MODEL_DIR": "/nonexistent/model"}, "MODEL_DIR: /nonexistent/model is not a folder"),
        ({"MODEL_DIR": "{tmp}", "PORT": "http"}, "PORT must be an integer, got 'http'"),
        ({"MODEL_DIR": "{tmp}", "SCORING_TIMEOUT": "0"}, "SCORING_TIMEOUT must be at least"),
        ({"MODEL_DIR": "{tmp}", "EXIT_ON_INIT_FAILURE": "maybe"}, "EXIT_ON_INIT_FAILURE must be 1/true"),
        ({"MODEL_DIR": "{tmp}", "SCORING_THREADS": "lots"}, "SCORING_THREADS must be a positive integer"),
        ({"MODEL_DIR": "{tmp}", "LOG_LEVEL": "loud"}, "LOG_LEVEL must be DEBUG"),
        ({"MODEL_DIR": "{tmp}", "SCORING_MAX_BATCH_SIZE": "0"}, "SCORING_MAX_BATCH_SIZE must be at least 1"),
        (
            {"MODEL_DIR": "{tmp}", "SCORING_MAX_BATCH_SIZE": "4096"},
            "max_batch_size: .*less than or equal to 1024",
        ),
        (
            {"MODEL_DIR": "{tmp}", "SCORING_MAX_BATCH_DELAY_MS": "soon"},
            "SCORING_MAX_BATCH_DELAY_MS must be a number",
        ),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, env: dict[str, str], message: str) -> None:
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    env["MODULE_JSON"] = str(tmp_path / "none.json")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(env, [])


def test_batching_defaults_and_environment(tmp_path: Path) -> None:
    base = {"MODEL_DIR": str(tmp_path), "MODULE_JSON": str(tmp_path / "none.json")}
    assert load_config(base, []).batching.model_dump() == {"max_batch_size": 32, "max_batch_delay_ms": 0.0}
    tuned = load_config({**base, "SCORING_MAX_BATCH_SIZE": "8", "SCORING_MAX_BATCH_DELAY_MS": "2.5"}, [])
    assert (tuned.batching.max_batch_size, tuned.batching.max_batch_delay_ms) == (8, 2.5)


def test_bad_module_json_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "module.json"
    path.write_text(json.dumps({"name": "Bad Name"}))
    with pytest.raises(ConfigError, match=r"module.json: name: 'Bad Name' is not a valid name"):
        load_config({"MODULE_JSON": str(path)}, [])


def test_help_lists_every_variable() -> None:
    text = parser().format_help()
    for name in VARIABLES:
        assert name in text


def test_the_scoring_key_never_shows_in_the_config_repr(tmp_path: Path) -> None:
    config = load_config({"MODEL_DIR": str(tmp_path), "SCORING_KEY": "s3cret-key"}, [])
    assert config.scoring_key == "s3cret-key"
    assert "s3cret-key" not in repr(config)
