"""The `vstream` command line: the one table of its commands, the typer app built from it, and the entry point.

Each command is a typed function in its own module of this package (`info`, `ask`, `run`, `demo`, `serve`, `eval`,
`train`, `synth`, `world`; the benchmarks in `bench`, `bench_scale` and `bench_models`); shared option types are in
`options`, the optional extras in `extras`. This module names the commands and registers them, nothing else: no
command registers itself by being imported, and no command module imports this one.

`main` (the console script, `python -m vstream` and `python -m vstream.cli`) prints a `vstream.errors.VStreamError`
(bad input: an option, a path, a config, a source, a missing extra) as one line on stderr and exits with code 2; every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from vstream.cli import ask, bench, bench_models, bench_scale, demo, info, run, serve, synth, train, world
from vstream.cli import eval as evaluation
from vstream.errors import VStreamError

COMMANDS: dict[str, Callable[..., None] | dict[str, Callable[..., None]]] = {
    "info": info.info,
    "ask": ask.ask,
    "run": run.run,
    "demo": demo.demo,
    "serve": serve.serve,
    "extract-features": evaluation.extract_features_command,
    "eval": evaluation.eval_command,
    "train": train.train,
    "synth": synth.synth,
    "world-eval": world.world_eval,
    "bench": {
        "memory": bench.bench_memory,
        "encode": bench.bench_encode,
        "answer": bench.bench_answer,
        "streams": bench.bench_streams,
        "profile": bench.bench_profile,
        "all": bench.bench_all,
        "stream": bench.bench_stream,
        "serve": bench.bench_serve,
        "pages": bench_scale.bench_pages,
        "decode": bench_scale.bench_decode,
        "cluster": bench_scale.bench_cluster,
        "qwen": bench_models.bench_qwen,
        "startup": bench_models.bench_startup,
        "demo-paths": bench_models.bench_demo_paths,
    },
}
"""Command name -> its function, or a group name -> its subcommands; `vstream --help` lists them in this order
(typer lists groups after the commands)."""

GROUP_HELP = {"bench": "Benchmarks; each prints what it ran on."}
"""The help line of each command group of COMMANDS."""


def build_app(commands: dict = COMMANDS) -> typer.Typer:
    """A typer app with every command of `commands` registered under its name."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Real-time question answering over video streams.")
    for name, command in commands.items():
        if isinstance(command, dict):
            group = typer.Typer(no_args_is_help=True, help=GROUP_HELP[name])
            for sub, function in command.items():
                group.command(sub)(function)
            app.add_typer(group, name=name)
        else:
            app.command(name)(command)
    return app


app = build_app()


def main() -> None:
    """Console entry point: a VStreamError becomes one line on stderr and exit code 2."""
    try:
        app()
    except VStreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
