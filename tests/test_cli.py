"""The `bayling` command: one entry point, subcommands with --help, one-line errors."""

import pytest

from bayling.cli import COMMANDS
from tests.conftest import bayling_cli


def test_help_lists_every_subcommand():
    out = bayling_cli("--help").stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_help(name):
    run = bayling_cli(name, "--help")
    assert run.returncode == 0 and run.stdout.startswith(f"usage: bayling {name}")


def test_unknown_command_is_a_usage_error():
    run = bayling_cli("frobnicate", check=False)
    assert run.returncode == 2 and "invalid choice" in run.stderr


def test_serve_refuses_a_folder_without_an_engine(tmp_path):
    run = bayling_cli("serve", "--engine", str(tmp_path), check=False)
    assert run.returncode == 1
    assert run.stderr.strip() == f"bayling serve: error: {tmp_path} is not a finished engine folder (no manifest.json); run 'bayling build' first"
