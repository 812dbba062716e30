"""Structured log lines for every service process: ``ts=... level=... node=... logger=... msg="..."``."""
from __future__ import annotations

import logging
import sys
import time


class KeyValueFormatter(logging.Formatter):
    """Structured log lines: ``ts=... level=... node=... logger=... msg="..."``."""

    def __init__(self, node_id: int | str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage().replace('"', "'")
        line = f'ts={ts} level={record.levelname.lower()} node={self.node_id} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


def setup_logging(node_id: int | str, verbose: bool, loggers: tuple[str, ...] = ("zwallet",)) -> None:
    """One stderr handler with ``KeyValueFormatter``; WARNING and up, and with ``verbose`` INFO from the
    Raft driver and from ``loggers`` (the app's)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    if verbose:
        logging.getLogger("engine.raft").setLevel(logging.INFO)
        for name in loggers:
            logging.getLogger(name).setLevel(logging.INFO)
