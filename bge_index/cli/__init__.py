"""The `bge-index` command: a thin Typer layer over the library, and the only part of bge-index that prints.

This package turns flags (with BGE_INDEX_* environment fallbacks) into
library calls, shows progress on stderr and results on stdout. This module
owns the Typer `app` (which commands exist, under which names), `--version`,
and the one mapping of library errors to what the user sees: every command
runs inside `run_library_call`, so a `BgeIndexError` from anywhere becomes
one line, `bge-index: error: MESSAGE`, and its exit code (1 failure,
2 usage, 75 index busy; 130/143 for an interrupt), never a traceback.

One module per command (index, search, serve, eval, info, verify, export), with
display.py for the printing they share and options.py for shared options.
No module imports torch at import time: only `search`, `serve`, `eval` and an `index`
run with something to encode load the model, inside the command.

The top of the layout: it may import every part. Must never import: nothing
above it exists; no part may import the CLI back.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from bge_index import __version__
from bge_index.cli import eval as eval_command
from bge_index.cli import embed, export, get, index, info, search, serve, verify
from bge_index.cli.display import error, stderr, stdout
from bge_index.errors import BgeIndexError

T = TypeVar("T")
EXIT_INTERRUPTED = 130  # 128 + SIGINT

app = typer.Typer(
    name="bge-index",
    help="Index documents into BGE-M3 sparse + dense vectors (Parquet shards) and search them.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help is plain text: `bge-index[ray]` keeps its brackets (rich markup ate them)
)


def run_library_call(action: Callable[[], T]) -> T:
    """Run `action`, turning a library error into one clear line and its exit code, an interrupt into 130."""
    try:
        return action()
    except BgeIndexError as failure:
        error(str(failure))
        raise typer.Exit(failure.exit_code) from None
    except KeyboardInterrupt as interrupt:
        stderr.print("bge-index: interrupted")
        # A second SIGTERM (index.StopNow) exits 143 like the first; Ctrl-C 130.
        raise typer.Exit(128 + getattr(interrupt, "signal_number", EXIT_INTERRUPTED - 128)) from None


def library_command(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with its errors mapped by `run_library_call`; Typer still sees its signature (`functools.wraps`)."""

    @functools.wraps(command)
    def mapped(*args, **kwargs) -> None:
        return run_library_call(lambda: command(*args, **kwargs))

    return mapped


def _version(value: bool) -> None:
    if value:
        stdout.print(f"bge-index {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Index documents into BGE-M3 sparse + dense vectors (Parquet shards) and search them."""


app.command("index")(library_command(index.index))
app.command("search")(library_command(search.search))
app.command("eval")(library_command(eval_command.evaluate_index))
app.command("serve")(library_command(serve.serve))
app.command("info")(library_command(info.info))
app.command("verify")(library_command(verify.verify))
app.command("get")(library_command(get.get))
app.command("embed")(library_command(embed.embed))

export_app = typer.Typer(help="Copy an index into a search engine that serves it at scale.", no_args_is_help=True,
                         rich_markup_mode=None)
export_app.command("milvus")(library_command(export.export_milvus))
export_app.command("parquet")(library_command(export.export_parquet))
app.add_typer(export_app, name="export")


def main() -> None:
    """The console script `bge-index` (and `python -m bge_index`): run the command, then exit at once.

    Usage errors are one `bge-index: error:` line and exit 2, like every other error. The process ends
    with `os._exit` once output is flushed and atexit handlers have run: the native libraries' own threads
    (tokenizers, torch, Arrow) may still be running when the interpreter tears down, and a C++ thread
    destroyed then aborts the process (SIGABRT, "terminate called without an active exception") after
    the command has succeeded. Nothing of ours is left to do by then.
    """
    _exit_now(_run_app())


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error base class: Typer >= 0.26 carries its own Click, older ones use the click package."""
    try:
        from typer._click.exceptions import ClickException  # Typer's own Click (no public name for it)
    except ImportError:
        from click.exceptions import ClickException
    return (ClickException,)


_CLICK_ERRORS = _click_errors()


def _run_app() -> int:
    """The command's exit code, with Click's usage errors and aborts as one line each."""
    try:
        result = app(standalone_mode=False)
    except _CLICK_ERRORS as problem:
        if type(problem).__name__ == "NoArgsIsHelpError":  # `bge-index` alone: the help is the message
            sys.stderr.write(problem.format_message() + "\n")
            return problem.exit_code
        context = getattr(problem, "ctx", None)
        where = f" (see `{context.command_path} --help`)" if context is not None else ""
        # Typer passes pydantic's "Value error, ..." through: the reader needs only what follows it
        message = " ".join(problem.format_message().replace("Value error, ", "").split())
        error(message + where)
        return problem.exit_code
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        stderr.print("bge-index: interrupted")
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the reader is gone, nothing more to say
            pass
    atexit._run_exitfuncs()  # Ray's shutdown and other Python-level clean-ups still run
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
