"""The command table and the entry point: every command of COMMANDS is registered under its name, `main` turns a
VStreamError into one line and exit code 2 and lets every other exception through, and `python -m vstream` and
`python -m vstream.cli` run the same app."""

import sys

import pytest
import typer

import vstream.cli as cli
from helpers import vstream_cli
from vstream.cli.options import BENCH_DEFAULT_PRESET, DEFAULT_MODEL
from vstream.errors import MissingPathError, UserInputError, VStreamError


def _run_main(monkeypatch, capsys, app: typer.Typer, *args) -> tuple[int, str]:
    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["vstream", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code or 0, capsys.readouterr().err


def _app_raising(exc: Exception) -> typer.Typer:
    """An app of two commands (typer runs a lone command without its name): `boom` raises `exc`."""
    def boom() -> None:
        raise exc

    return cli.build_app({"boom": boom, "quiet": lambda: None})


def test_every_command_of_the_table_is_registered_under_its_name():
    assert list(typer.main.get_group(cli.app).commands) == list(cli.COMMANDS)  # the order of `vstream --help`
    commands = {c.name: c.callback for c in cli.app.registered_commands}
    groups = {g.name: g.typer_instance for g in cli.app.registered_groups}
    for name, command in cli.COMMANDS.items():
        if isinstance(command, dict):
            assert {c.name: c.callback for c in groups[name].registered_commands} == command
            assert groups[name].info.help == cli.GROUP_HELP[name]
        else:
            assert commands[name] is command


def test_the_two_defaults_are_two_names():
    assert (DEFAULT_MODEL, BENCH_DEFAULT_PRESET) == ("demo", "tiny")


@pytest.mark.parametrize("exc", [UserInputError("--speed must be > 0, got 0"), MissingPathError("x does not exist")])
def test_a_vstream_error_is_one_line_and_exit_2(monkeypatch, capsys, exc):
    code, err = _run_main(monkeypatch, capsys, _app_raising(exc), "boom")
    assert code == 2 and err == f"error: {exc}\n" and isinstance(exc, VStreamError)


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), FileNotFoundError("a bug")])
def test_any_other_exception_keeps_its_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "app", _app_raising(exc))
    monkeypatch.setattr(sys, "argv", ["vstream", "boom"])
    with pytest.raises(type(exc), match="a bug"):
        cli.main()


@pytest.mark.parametrize("module", ["vstream", "vstream.cli"])
def test_python_dash_m_runs_the_whole_command_line(module):
    out = vstream_cli("bench", "memory", "--preset", "nope", module=module, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: --preset must be one of"), out.stderr
