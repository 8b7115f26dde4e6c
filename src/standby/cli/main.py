"""The `standby` command. Subcommands live in modules of this package that own one
topic each; this module assembles them and is the one place where errors become exit
codes and messages (tracebacks only with --debug)."""

from __future__ import annotations

import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from standby import __version__
from standby.cli import demo_cmds, readiness_cmds
from standby.cli import replication_cmds
from standby.cli import discover_cmds
from standby.cli import control_cmds, recovery_cmds, server_cmds
from standby.errors import StandbyError

app = typer.Typer(
    name="standby",
    help="Standby: open site recovery for virtual machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"standby {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


readiness_cmds.register(app)
demo_cmds.register(app)
replication_cmds.register(app)
discover_cmds.register(app)
control_cmds.register(app)
recovery_cmds.register(app)
server_cmds.register(app)


def run(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and translate every error into an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rc = app(args=args, prog_name="standby", standalone_mode=False)
    except StandbyError as exc:
        if debug:
            traceback.print_exc()
        # soft_wrap: print the message as is; hard wrapping would split file paths.
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except typer.TyperException as exc:  # a usage error (Typer vendors Click: no `import click`)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err_console.print(f"error: {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # a bug
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
                          "(run with --debug for the traceback; please report it)", highlight=False, soft_wrap=True)
        return 70
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(run())
