"""Shared CLI plumbing: clear one-line errors instead of tracebacks, rich console, progress.

Streams, as Unix tools do: data (tables, listings, `--json`) goes to stdout through `emit` /
`emit_json`; progress, logs, warnings and errors go to stderr through `console`.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

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

#: progress, logs, warnings and errors (stderr); piped into a log file, lines are not wrapped
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty(), emoji=False)  # "case:A:1" is no emoji


def _stdout_console() -> Console:
    """A console on the current stdout; piped output is not wrapped at 80 columns. Data is
    printed as it is: no markup ("macrophage [m1]"), emoji (":x:") or highlighting."""
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((200, 24)).columns, 200)
    return Console(file=sys.stdout, width=width, soft_wrap=width is not None, markup=False, emoji=False, highlight=False)


def emit(renderable) -> None:
    """Data (a rich Table or text) to stdout."""
    _stdout_console().print(renderable)


def _finite(obj):
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """`obj` as JSON on stdout (strict: NaN becomes null, other types their str)."""
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=str))), indent=2, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


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


_PACKAGES = Path(__file__).resolve().parents[1]
_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own UserWarnings as one `warning:` line on stderr (no source line); others as Python does."""
    try:
        ours = Path(filename).resolve().relative_to(_PACKAGES).parts[0] in ("embedstore", "heads", "cli")
    except ValueError:
        ours = False
    if ours and issubclass(category, UserWarning):
        console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def run(app: typer.Typer) -> Callable[[], None]:
    """Entry point wrapper: a UserError prints its message and exits non-zero, no traceback."""

    def main() -> None:
        warnings.filterwarnings("default")
        warnings.showwarning = _show_warning
        try:
            code = app(standalone_mode=False)  # click returns a typer.Exit's code here
            if isinstance(code, int) and code:
                sys.exit(code)
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
        TextColumn("{task.description}", style="bold", markup=False),  # descriptions name slides
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
