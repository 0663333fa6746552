"""The package's front doors: the public names of ``fisherlab`` and the command dispatcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fisherlab
from fisherlab.cli import COMMANDS, main


def test_all_lists_exactly_the_exports():
    assert set(fisherlab.__all__) == {"__version__", *fisherlab._EXPORTS}


@pytest.mark.parametrize("name", fisherlab.__all__)
def test_every_public_name_resolves(name):
    assert getattr(fisherlab, name) is not None
    assert name in dir(fisherlab)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fisherlab.nothing  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    # The CLI parses before importing a command's module: `fisherlab --help` stays fast.
    code = "import sys, fisherlab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dispatcher_lists_every_command_and_its_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"fisherlab {fisherlab.__version__}"


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["record", "--no-such-option"]])
def test_dispatcher_bad_input_is_one_line_and_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fisherlab")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fisherlab {command}")


def test_the_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fisherlab.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fisherlab {fisherlab.__version__}"
