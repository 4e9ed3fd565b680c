"""datm's messages: one logger, "datm"; each module logs to its child, `get_logger(__name__)`.

A library user sees nothing unless they configure logging (the standard library's convention: the
"datm" logger holds a `NullHandler`). `setup` is what the `datm` command calls: plain messages, as
`print` wrote them, on stdout (or stderr, when stdout carries a command's data, e.g. `--json`), and
only from the main process: under `accelerate launch` or torchrun that is the process whose `RANK`
(else `LOCAL_RANK`) is 0 or unset. The other processes' warnings and errors still pass, prefixed
with their rank. What a command prints as its result (a plan, a score table, JSON) is printed,
not logged: `--quiet` does not hide it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

ROOT = "datm"
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """`logging.getLogger(name)` (a module's `__name__`: a child of "datm"), once "datm" has its
    NullHandler: importing this module added it."""
    return logging.getLogger(name)


def rank() -> int | None:
    """This process's rank under a multi-process launcher: `RANK`, else `LOCAL_RANK`; None when
    neither is set (or is not a number)."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def is_main_process() -> bool:
    return rank() in (None, 0)


class MainProcessFilter(logging.Filter):
    """Everything from the main process; warnings and errors only from the others."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_main_process()


class RankFormatter(logging.Formatter):
    """The message alone, prefixed with the rank when another process than the main one says it."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        r = rank()
        return text if r in (None, 0) else f"[rank {r}] {text}"


class ConsoleHandler(logging.StreamHandler):
    """Writes to `sys.stdout` (or `sys.stderr`) as it is when a message comes, not as it was at
    setup: pytest's capsys and `contextlib.redirect_stdout` replace it; `print` finds the new one
    too, so logged lines and printed results keep their order."""

    def __init__(self, to_stderr: bool = False) -> None:
        super().__init__()
        self.to_stderr = to_stderr

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr if self.to_stderr else sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ sets one; ours is looked up
        pass


def _handler(logger: logging.Logger) -> ConsoleHandler | None:
    return next((h for h in logger.handlers if isinstance(h, ConsoleHandler)), None)


def setup(level: int | str = logging.INFO, stderr: bool = False) -> logging.Logger:
    """Show datm's messages at `level` and above on stdout (`stderr`: on stderr), from the main
    process. Idempotent: calling it again changes the level and the stream, never adds a handler.
    The "datm" logger stops propagating, so a root handler (someone's `basicConfig`) does not print
    each line twice."""
    logger = logging.getLogger(ROOT)
    handler = _handler(logger)
    if handler is None:
        handler = ConsoleHandler()
        handler.addFilter(MainProcessFilter())
        handler.setFormatter(RankFormatter())
        logger.addHandler(handler)
    handler.to_stderr = stderr
    logger.setLevel(level)
    logger.propagate = False
    return logger


def configured_level() -> int | None:
    """The level `setup` set, or None when it was not called (a library user's process): what a
    worker process (Ray) sets up in turn."""
    logger = logging.getLogger(ROOT)
    return logger.level if _handler(logger) is not None else None
