"""Checking that an answer to the outside names a reason code and nothing of the driver's."""

from __future__ import annotations

import re

# An exception class name (`ServerSelectionTimeoutError`, `AMQPConnectionError`, `OSError`,
# `AutoReconnect`, ...), an errno, or a repr's opening: what `repr(e)` of a driver error holds.
_DRIVER_WORDS = re.compile(
    r"[A-Za-z]*(Error|Exception|Failure|Reconnect|Timeout|Refused)\b|Errno|\w+\(['\"<]"
)


def driver_details(text: str, *addresses: str) -> list[str]:
    """What in `text` looks like an exception's class, an errno, a repr, or one of `addresses`."""
    found = [match.group(0) for match in _DRIVER_WORDS.finditer(text)]
    return found + [address for address in addresses if address in text]
