"""Command-line tools whose output pipe closes early (``| head``) end quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import DEFAULT_CONFIG
from cloud.devices import AGENT_CONFIG_FILE
from modules.pipes import EXIT_BROKEN_PIPE

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["cloud.cli", "schema", "deployment"], ["agent", "schema"]])
def test_a_closed_output_pipe_is_no_traceback(command: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the tool writes (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(60) == EXIT_BROKEN_PIPE
    assert err == "", err


def test_the_systemd_unit_reads_the_file_device_add_writes() -> None:
    unit = (REPO / "packaging" / "systemd" / "edge-agent.service").read_text()
    assert DEFAULT_CONFIG.name == AGENT_CONFIG_FILE
    assert f"check-config --config {DEFAULT_CONFIG}" in unit
    assert f"run --config {DEFAULT_CONFIG}" in unit
