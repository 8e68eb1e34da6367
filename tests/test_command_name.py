"""The demo's "Next:" line must be a command the user can paste: `facecli` only where it is on PATH."""

from __future__ import annotations

import sys

from facecli.commands.common import command_name


def test_facecli_on_path_is_named_plainly(monkeypatch, tmp_path):
    exe = tmp_path / "facecli"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert command_name() == "facecli"


def test_off_path_the_path_that_was_run_or_python_m(monkeypatch, tmp_path):
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    exe = venv_bin / "facecli"
    exe.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(exe), "demo"])
    assert command_name() == ".venv/bin/facecli"
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert command_name().endswith(" -m facecli") and sys.executable in command_name()
