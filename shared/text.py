"""What a string that travels may hold: one definition for every message field that is a string.

A command is checked against these rules once, when the command consumer takes it; what passes
can then be stored (PostgreSQL jsonb, MongoDB BSON), published (AMQP properties and headers),
projected, logged and served as JSON without any later stage refusing it.

- An **identifier** (correlation and causation ids, user names, codes, owner ids) is printable
  ASCII without spaces, at most `IDENTIFIER_MAX_BYTES` bytes, so it fits every AMQP short string
  (255 bytes) it is copied into, a MongoDB key or `_id`, and a log field, as it is.
- **Free text** (names, reasons, descriptions) is any Unicode text except what breaks a later
  stage or misleads a reader: control characters (C0, DEL, C1: PostgreSQL refuses NUL, and
  line breaks forge log lines), lone surrogates (not encodable as UTF-8), noncharacters, and the
  bidirectional embedding, override and isolate controls (text that displays in another order than
  it is stored). Its limit is in UTF-8 bytes, not characters.
- A **payload** is JSON of bounded depth whose keys are identifiers of the `FIELD_NAME` shape
  (no `$`, no `.`: they may become MongoDB field names) and whose strings are free text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator

IDENTIFIER_MAX_BYTES = 128
# What an AMQP short string (properties, header table keys, routing keys) holds.
AMQP_SHORT_STRING_BYTES = 255
TEXT_MAX_BYTES = 1_024
PAYLOAD_MAX_DEPTH = 16

IDENTIFIER_PATTERN = rf"[\x21-\x7e]{{1,{IDENTIFIER_MAX_BYTES}}}"
FIELD_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)
_FIELD_NAME = re.compile(FIELD_NAME_PATTERN)

# C0 and DEL and C1 controls, UTF-16 surrogates, the bidi embedding/override (U+202A-U+202E) and
# isolate (U+2066-U+2069) controls, and the noncharacters U+FDD0-U+FDEF and U+xxFFFE/U+xxFFFF.
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\ufdd0-\ufdef"
    + "".join(chr(plane * 0x10000 + last) for plane in range(17) for last in (0xFFFE, 0xFFFF))
    + "]"
)


class TextError(ValueError):
    """A string breaks the rules of this module; the message says which rule, never the value."""


def check_identifier(value: str, *, what: str = "identifier") -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise TextError(
            f"{what} must be 1 to {IDENTIFIER_MAX_BYTES} printable ASCII characters, no spaces"
        )
    return value


def is_identifier(value: object) -> bool:
    """Whether `value` is a string that may travel as an identifier (and so as an AMQP property)."""
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None


def check_text(value: str, *, max_bytes: int = TEXT_MAX_BYTES, what: str = "text") -> str:
    found = _FORBIDDEN.search(value)
    if found is not None:
        raise TextError(
            f"{what} holds a character that may not travel (U+{ord(found.group()):04X} at "
            f"index {found.start()}): control characters, lone surrogates, noncharacters and "
            "bidirectional overrides are refused"
        )
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise TextError(f"{what} is {size} bytes in UTF-8, above the limit of {max_bytes}")
    return value


def check_payload(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check every key and string of a JSON payload; the depth is bounded too."""
    _check_value(payload, depth=0, where="payload")
    return payload


def _check_value(value: Any, *, depth: int, where: str) -> None:
    if depth > PAYLOAD_MAX_DEPTH:
        raise TextError(f"{where} nests deeper than {PAYLOAD_MAX_DEPTH} levels")
    if isinstance(value, str):
        check_text(value, what=where)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not _FIELD_NAME.fullmatch(key):
                raise TextError(
                    f"{where} has a field name that is not letters, digits and underscores "
                    "(at most 64, not starting with a digit)"
                )
            _check_value(item, depth=depth + 1, where=f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, depth=depth + 1, where=f"{where}[{index}]")


Identifier = Annotated[str, AfterValidator(check_identifier)]
"""An identifier that travels (see the module's rules)."""

FreeText = Annotated[str, AfterValidator(check_text)]
"""Free text of at most `TEXT_MAX_BYTES` UTF-8 bytes (see the module's rules); for another
limit: `Annotated[str, AfterValidator(lambda v: check_text(v, max_bytes=200))]`."""
