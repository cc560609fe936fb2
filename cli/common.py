"""Shared CLI plumbing: clear one-line errors instead of tracebacks, rich console, progress."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from embedstore.errors import UserError

console = Console(stderr=True)


def run(app: typer.Typer) -> Callable[[], None]:
    """Entry point wrapper: a UserError prints its message and exits non-zero, no traceback."""

    def main() -> None:
        warnings.filterwarnings("default")
        try:
            app(standalone_mode=False)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except (typer.Exit, SystemExit) as exc:
            code = getattr(exc, "exit_code", getattr(exc, "code", 0))
            sys.exit(code or 0)
        except typer.Abort:
            console.print("aborted")
            sys.exit(130)
        except Exception as exc:  # click usage errors carry their own exit code
            import click

            if isinstance(exc, click.ClickException):
                exc.show()
                sys.exit(exc.exit_code)
            raise

    return main


def progress(quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
