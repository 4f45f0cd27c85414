"""Log output of the long-running commands (`dume-coordinator serve`, `dume-node join`): lines for people by
default, or one JSON object per line for a log collector (``--log-format json``).

Nothing secret is logged: join tokens and keys never reach a log call. As a second line of defence every record
is passed through ``redact``, which masks anything shaped like a join token or a PEM private key.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

LOG_FORMATS = ("human", "json")
# A join token is "dume1." plus base64url (see shared.trust.join_token); a PEM private key is a BEGIN/END block.
SECRET_PATTERNS = (
    re.compile(r"dume1\.[A-Za-z0-9_\-=]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
)
REDACTED = "<redacted>"


def redact(text: str) -> str:
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """The given line format, with secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def add_log_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="human",
                        help="human: readable lines (default); json: one JSON object per line "
                             "(time, level, logger, message)")


def configure_logging(log_format: str, human_format: str) -> None:
    """Send INFO and above to stderr in ``log_format``; ``human_format`` is the %-style line for people."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else HumanFormatter(human_format))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
