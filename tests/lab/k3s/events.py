"""The stand-in's one log line per event, and the refusal that ends it with exit 1."""

from __future__ import annotations

import json
import sys


class Refused(Exception):
    """The stand-in will not go on; `reason` is a log token, the message one line for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def log(event: str, **fields: object) -> None:
    """One `k3s-standin event=NAME key=value ...` line on stderr (values with spaces quoted)."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={json.dumps(text) if not text or ' ' in text else text}")
    print("k3s-standin", *parts, file=sys.stderr, flush=True)
