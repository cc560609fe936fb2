"""Shared CLI plumbing: clear one-line errors instead of tracebacks, rich console, progress."""

from __future__ import annotations

import errno
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


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error class, and the copy of click that typer >= 0.29 vendors."""
    import click

    found = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as TyperClickException
    except ImportError:
        pass
    else:
        found.append(TyperClickException)
    return tuple(found)


_CLICK_ERRORS = _click_errors()
#: OSErrors caused by the user's paths or machine (not bugs): reported in one line
_USER_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG,
}  # fmt: skip


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
        except OSError as exc:  # a place that cannot be read or written: say which, no traceback
            if exc.errno not in _USER_ERRNOS:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            console.print(f"[bold red]error:[/] {escape(str(exc.strerror or exc))}{escape(where)}", highlight=False, soft_wrap=True)
            sys.exit(UserError.exit_code)
        except _CLICK_ERRORS as exc:  # usage errors (missing option, bad value): exit 2
            exc.show()
            sys.exit(exc.exit_code)

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
