"""What every command module shares: the console, the error handler, common argument types and run lookup.

Only typer and the standard library are imported here, so ``pcltool --help`` stays instant."""

from __future__ import annotations

import contextlib
import functools
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def escape(text) -> str:
    """``text`` (a path, a name) made safe to print through rich: ``[x]`` is shown, not taken as markup."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (schedulers, ``docker stop``, ``kill``) ends a command the way Ctrl-C does: the running stage is
    recorded as interrupted and the run directory keeps what had finished. The previous handler is restored after."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(fn):
    """Turn pcltool's typed errors into a one-paragraph message and the error's exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import errno

        from pcltool.errors import PcltoolError

        try:
            with _sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            from rich.markup import escape

            where = f" writing {err.filename}" if err.filename else ""
            console(stderr=True).print(f"[bold red]error:[/] no space left on the device{escape(where)}; free some "
                                       "space and run the command again (`pcltool train --resume` continues a "
                                       "training run)", markup=True, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except PcltoolError as err:
            from rich.markup import escape

            console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", markup=True, soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            console(stderr=True).print("[bold red]interrupted[/] (the run directory keeps what had finished)")
            raise typer.Exit(code=130) from None

    return wrapper


RunArg = Annotated[Optional[Path], typer.Argument(help="run directory (default: the most recent run under runs/)")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="where to look for the most recent run")]


def open_run(run: Path | None, runs_dir: Path = Path("runs")):
    """The run directory ``run``, or the most recent one under ``runs_dir``."""
    from pcltool.manifest import RunDir

    return RunDir.open(run if run is not None else RunDir.latest(runs_dir))
