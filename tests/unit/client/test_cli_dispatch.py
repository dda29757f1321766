"""The one `bgremove` command: bgremove-client runs `remove` and hands the rest to the server's CLI,
or, in a client-only install, says in one line that the server package is needed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bgremove import cli

SERVERLESS = (
    # What a client-only install looks like from inside: bgremove_gateway cannot be imported.
    "import sys\n"
    "sys.modules['bgremove_gateway'] = None\n"
    "sys.modules['bgremove_gateway.cli'] = None\n"
    "from bgremove.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _bgremove(*args: str, serverless: bool = False) -> subprocess.CompletedProcess[str]:
    code = (
        SERVERLESS
        if serverless
        else "import sys\nfrom bgremove.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_every_command_when_the_server_is_installed() -> None:
    done = _bgremove("--help")
    assert done.returncode == 0, done.stderr
    for command in ("serve", "triton", "prepare-models", "remove", "keys", "bench"):
        assert command in done.stdout


def test_server_commands_reach_the_server_cli() -> None:
    done = _bgremove("serve", "--help")
    assert done.returncode == 0, done.stderr
    assert "--triton-url" in done.stdout


def test_keys_runs_in_the_server_cli(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    added = _bgremove("keys", "add", "acme", "--file", str(keys))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("bgr_")
    assert keys.exists()


def test_remove_does_not_import_the_server() -> None:
    code = (
        "import sys\n"
        "from bgremove.cli import main\n"
        "try:\n"
        "    main(['remove', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('bgremove_gateway' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines()[-1] == "False"
    assert "usage: bgremove remove" in done.stdout


@pytest.mark.parametrize("command", cli.SERVER_COMMANDS)
def test_without_the_server_its_commands_say_so_in_one_line(command: str) -> None:
    done = _bgremove(command, "--help", serverless=True)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"bgremove {command}: needs the bgremove server package")


def test_without_the_server_help_lists_remove() -> None:
    done = _bgremove("--help", serverless=True)
    assert done.returncode == 0, done.stderr
    assert "remove" in done.stdout and "serve" in done.stdout  # the epilog names what is missing
    assert "usage: bgremove remove" in _bgremove("remove", "--help", serverless=True).stdout


def test_without_the_server_an_unknown_command_is_a_usage_error() -> None:
    done = _bgremove("frobnicate", serverless=True)
    assert done.returncode == 2
    assert "invalid choice: 'frobnicate'" in done.stderr


def test_a_broken_server_install_is_not_mistaken_for_a_missing_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server present but one of its dependencies missing: the real error, not the hint."""

    def broken(name: str) -> None:
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="numpy"):
        cli.server_main()


def test_the_client_knows_every_server_command() -> None:
    """So that a client-only install names each of them as the server's, not as a typo."""
    from bgremove_gateway.cli import build_parser

    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) - {"remove"} == set(cli.SERVER_COMMANDS)


def test_importing_the_package_and_the_command_loads_no_grpc() -> None:
    """The command sets GRPC_VERBOSITY before gRPC reads it, which gRPC does once, at import."""
    code = "import sys, bgremove, bgremove.cli\nprint('grpc' in sys.modules)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"
