"""Loading-stage logging. Every stage of a load is logged under the ``splitlearn`` logger with
its elapsed time, so that a slow load can be told from a stuck one (seed 004)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

logger = logging.getLogger("splitlearn")


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


@contextlib.contextmanager
def stage(log: logging.Logger, what: str, **fields: object) -> Iterator[None]:
    """Log ``what`` when it starts and when it ends (with seconds), or that it failed."""
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    log.info("stage start: %s %s", what, extra)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        log.error("stage failed: %s after %.3fs: %s: %s", what, time.perf_counter() - t0, type(exc).__name__, exc)
        raise
    log.info("stage done: %s in %.3fs", what, time.perf_counter() - t0)
