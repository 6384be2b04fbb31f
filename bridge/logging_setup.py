"""Log lines for technicians: one line per event, terminal and transaction named, no card data.

Under systemd (JOURNAL_STREAM set) the timestamp is left to the journal, and each line starts
with its syslog priority (`<4>` for a warning): journald reads that prefix
(SyslogLevelPrefix=, on by default), so `journalctl -u poi-bridge -p warning` shows the
warnings and errors. Without it every line would be stored at the unit's default, info.
"""

from __future__ import annotations

import logging
import os
import sys

from bridge.redaction import RedactingFilter


# logging's levels as syslog priorities (sd-daemon(3): <2> crit, <3> err, <4> warning, ...)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    """Each line prefixed with its syslog priority, for journald. A multi-line record (a
    traceback) gets the prefix on every line: journald stores each line as its own entry."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), 7)
        prefix = f"<{priority}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def print_problem(line: str) -> None:
    """A line that stops the daemon before logging is set up (its configuration cannot be
    read) to stderr, as an error to journald: plain, it was stored at the unit's default,
    info, and `journalctl -u poi-bridge -p warning` did not show why the daemon stopped."""
    prefix = "<3>" if "JOURNAL_STREAM" in os.environ else ""
    print(prefix + line.replace("\n", "\n" + prefix), file=sys.stderr)


def setup_logging(level: str = "info") -> None:
    under_journald = "JOURNAL_STREAM" in os.environ
    handler = logging.StreamHandler(sys.stderr)
    if under_journald:
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (paho, asyncio) is not for the technician unless debugging.
    if level != "debug":
        logging.getLogger("asyncio").setLevel(logging.WARNING)
