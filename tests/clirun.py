"""Run a CLI command in this process: the same entry point (`cli.embed.main`, `cli.heads.main`)
as `python -m cli.embed ...`, with argv, stdout and stderr swapped for the call.

A subprocess pays ~5-9 s of imports (torch, lancedb, scikit-learn) per call on a 2-core
machine; most CLI tests check what a command prints, writes and exits with, which this shows
the same way. Tests of process boundaries (a kill, concurrent writers, a pipe, a fresh
interpreter's imports) keep using real subprocesses.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import traceback
import warnings


def run_cli(module: str, *args, input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in-process: a CompletedProcess with returncode, stdout and
    stderr as text. An uncaught exception is a traceback on stderr and exit status 1, as in
    a subprocess. `env`: variables set for the call (read when the command runs, not at
    import). The caller's environment, warning filters, torch thread count and stdin are
    restored."""
    main = importlib.import_module(module).main
    argv = [module.rsplit(".", 1)[-1], *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    threads = _torch_threads()
    saved_argv, saved_stdin, saved_env = sys.argv, sys.stdin, dict(os.environ)
    code = 0
    try:
        os.environ.update(env or {})
        sys.argv = argv
        sys.stdin = io.StringIO(input or "")
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int | None):
                    print(exc.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what Python prints before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
        os.environ.clear()
        os.environ.update(saved_env)
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv[1:]], code, out.getvalue(), err.getvalue())


def embed(*args, **kw) -> subprocess.CompletedProcess:
    return run_cli("cli.embed", *args, **kw)


def heads(*args, **kw) -> subprocess.CompletedProcess:
    return run_cli("cli.heads", *args, **kw)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None
