"""Every failure of an `embedpipe` command as one line on stderr and its documented exit code (a
traceback only with -vv); SIGTERM handled like Ctrl-C while a command changes a folder."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Iterator

import click

from .config import ConfigError

EXIT_FAILED, EXIT_USAGE = 1, 2  # 1: some units (or the index) failed, or a failure once the folder
# changed (in the summary); 2: usage, config, environment, found before any work
EXIT_SIGNAL = 128  # + the signal's number: 130 for SIGINT (Ctrl-C), 143 for SIGTERM
log = logging.getLogger("pipeline.cli")


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so a run stops taking
    work, leaves its committed units as they are and releases its lock."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def fail(message: str, code: int) -> None:
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        log.debug("traceback", exc_info=True)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _os_error(exc: OSError) -> str:
    where = exc.filename or ""
    if exc.filename2:
        where += f" -> {exc.filename2}"
    return f"{where + ': ' if where else ''}{exc.strerror or exc}"


@contextlib.contextmanager
def one_line_errors(interruptible: bool = False) -> Iterator[None]:
    """Map every failure to one line and its exit code; with interruptible, SIGTERM is handled
    like Ctrl-C (the handler is the process's while the block runs)."""
    from .io.checks import DamagedFile
    from .io.ledger import LockedError, SettingsMismatch
    from .io.storage import ConcurrentWrite
    from .sinks.base import SinkError
    from .tools.artifacts import FetchError

    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if interruptible else None
    try:
        yield
    except (ConfigError, LockedError, SettingsMismatch, ConcurrentWrite, FetchError) as exc:
        fail(str(exc), EXIT_USAGE)
    except SinkError as exc:  # a vector store failed mid-way: nothing half-applied, rerun
        fail(str(exc), EXIT_FAILED)
    except DamagedFile as exc:  # a committed file is not what was written: the line names it
        fail(str(exc), EXIT_FAILED)
    except OSError as exc:
        fail(_os_error(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        fail("interrupted (SIGINT); committed units are kept, a rerun finishes the rest",
              EXIT_SIGNAL + signal.SIGINT)
    except Interrupted as exc:
        fail(f"interrupted ({exc}); committed units are kept, a rerun finishes the rest",
              EXIT_SIGNAL + exc.signum)
    except Exception as exc:  # a bug: still one line, the traceback with -vv
        fail(f"unexpected {type(exc).__name__}: {exc} (run with -vv for the traceback, and "
              f"please report it)", EXIT_FAILED)
    finally:
        if interruptible:
            signal.signal(signal.SIGTERM, previous)
