"""The console: one channel for what a job tells its operator, Python's `logging`.

Every module logs to its own logger (`logging.getLogger(__name__)`); `attach_console` routes the
project's loggers (`rlhf_cluster.*`, `actors.*`) to standard output through `tqdm.write`, so a
line never breaks a progress bar (the bars stay tqdm's). Warnings and errors carry their level
("warning: ..."). Records still propagate: a handler on the root logger (pytest's, an
application's) sees them too. Ray-free.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

PROJECT_LOGGERS = ("rlhf_cluster", "actors")


class TqdmHandler(logging.Handler):
    """Writes each record with `tqdm.write` to the `sys.stdout` of the moment (a test's capture, a
    Ray worker's redirected stream), above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


class ConsoleFormatter(logging.Formatter):
    """The message alone at INFO; "warning: message" (or error, critical) above it."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def attach_console(level: int = logging.INFO) -> None:
    """Route the project's loggers to the console at `level`; once per process (idempotent)."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
            handler = TqdmHandler()
            handler.setFormatter(ConsoleFormatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(level)
