"""Which executables the daemons and the console scripts are run with, and that they run.

The same tests run in a virtual environment (`twistd` and the console scripts
next to `sys.executable`), at a Debian package build (Debian's `twistd3`, the
source tree on PYTHONPATH, no console scripts: `python -m <module>` instead)
and against the installed Debian package (`/usr/bin/twistd3`,
`/usr/bin/xaind`, `/usr/bin/xain-dummy-participants`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xaind.tools import daemons
from xaind.tools.daemons import (
    ExecutableNotFound,
    console_script_command,
    dummy_participants_command,
    run_twistd,
    twistd_executable,
    xaind_command,
)

REPOSITORY = Path(__file__).resolve().parent.parent

#: Bound on one run of a command that only parses its arguments.
RUN_TIMEOUT = 30.0


# -- the twistd that runs the daemons -------------------------------------------


def test_twistd_help_lists_both_plugins() -> None:
    """The `twistd` chosen runs on this Python and finds both plugins (an import-hook editable install would hide them)."""
    result = run_twistd("--help")
    assert result.returncode == 0, result.stdout
    commands = result.stdout.split("Commands:", 1)[1]
    assert re.search(r"^\s+xain-coordinator\s+xaind federated-learning coordinator", commands, re.MULTILINE), commands
    assert re.search(r"^\s+xain-aggregator\s+xaind federated-learning aggregator", commands, re.MULTILINE), commands


def fake_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    path.chmod(0o755)
    return path


@pytest.fixture
def python_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding a (fake) `python` that is `sys.executable`; PATH is an empty directory, no override."""
    bin_dir = tmp_path / "bin"
    fake_executable(bin_dir / "python")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv(daemons.TWISTD_ENVIRONMENT_VARIABLE, raising=False)
    return bin_dir


def test_the_twistd_next_to_python_comes_first(python_in: Path) -> None:
    twistd = fake_executable(python_in / "twistd")
    fake_executable(python_in / "twistd3")
    assert twistd_executable() == str(twistd)


def test_debians_twistd3_next_to_python_without_a_twistd(python_in: Path) -> None:
    twistd3 = fake_executable(python_in / "twistd3")
    assert twistd_executable() == str(twistd3)


def test_a_twistd_that_is_not_executable_is_passed_over(python_in: Path) -> None:
    (python_in / "twistd").write_text("not a program\n", encoding="utf-8")
    twistd3 = fake_executable(python_in / "twistd3")
    assert twistd_executable() == str(twistd3)


def test_path_is_searched_when_nothing_is_next_to_python(python_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = fake_executable(tmp_path / "elsewhere" / "twistd3")
    monkeypatch.setenv("PATH", str(elsewhere.parent))
    assert twistd_executable() == str(elsewhere)


def test_the_environment_variable_overrides_everything(python_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_executable(python_in / "twistd")
    chosen = fake_executable(tmp_path / "opt" / "my-twistd")
    monkeypatch.setenv(daemons.TWISTD_ENVIRONMENT_VARIABLE, str(chosen))
    assert twistd_executable() == str(chosen)
    assert daemons.twistd_command("xain-coordinator", "c.yaml", "c.log") == [
        str(chosen), "-n", "--pidfile=", "--logfile=c.log", "xain-coordinator", "--config", "c.yaml",
    ]  # fmt: skip


def test_an_override_naming_nothing_is_an_error(python_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_executable(python_in / "twistd")
    monkeypatch.setenv(daemons.TWISTD_ENVIRONMENT_VARIABLE, str(tmp_path / "missing"))
    with pytest.raises(ExecutableNotFound, match=r"\$XAIND_TWISTD names '.*missing', which is not an executable"):
        twistd_executable()


def test_no_twistd_at_all_is_an_error(python_in: Path) -> None:
    with pytest.raises(ExecutableNotFound, match=r"^no twistd or twistd3 next to .*/bin/python nor on PATH"):
        twistd_executable()


# -- the console scripts -------------------------------------------------------


def test_an_installed_console_script_is_run_as_installed(python_in: Path) -> None:
    script = fake_executable(python_in / "xain-dummy-participants")
    assert console_script_command("xain-dummy-participants", "xaind.tools.dummy_participants") == [str(script)]


def test_without_the_console_script_its_module_is_run(python_in: Path) -> None:
    assert console_script_command("xaind", "xaind.cli") == [str(python_in / "python"), "-m", "xaind.cli"]


def run(command: list[str], *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `command` from a directory other than the repository (an installed package does not need it)."""
    return subprocess.run(
        [*command, *arguments],
        cwd=os.path.dirname(REPOSITORY),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def test_xain_dummy_participants_runs() -> None:
    result = run(dummy_participants_command(), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: xain-dummy-participants"), result.stdout


def test_xaind_checkconfig_runs(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text("development: true\nfederated_learning:\n  rounds: 0\n", encoding="utf-8")
    result = run(xaind_command(), "checkconfig", str(config))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == ["config error: federated_learning.rounds: must be at least 1, got 0"]
