"""Log lines for technicians: one line per event, terminal and transaction named, no card data.

Under systemd (JOURNAL_STREAM set) the timestamp is left to the journal.
"""

from __future__ import annotations

import logging
import os
import sys

from bridge.redaction import RedactingFilter


def setup_logging(level: str = "info") -> None:
    under_journald = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (paho, asyncio) is not for the technician unless debugging.
    if level != "debug":
        logging.getLogger("asyncio").setLevel(logging.WARNING)
