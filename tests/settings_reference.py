"""The configuration reference: every setting, its default and what it does, from the models.

`python -m tests.settings_reference` prints the Markdown table that the README's "Settings"
section holds; `--write README.md` puts it there. A unit test fails when the two differ, so the
README cannot drift from the settings modules.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from command_service.settings import CommandServiceSettings
from cqrs_cli.settings import CliSettings
from cqrs_runtime.settings import CommonSettings
from query_service.settings import QueryServiceSettings

START = "<!-- settings-reference:start (python -m tests.settings_reference --write README.md) -->"
END = "<!-- settings-reference:end -->"

WHO: list[tuple[str, type[BaseSettings]]] = [
    ("both", CommonSettings),
    ("command", CommandServiceSettings),
    ("query", QueryServiceSettings),
    ("`cqrs` tool", CliSettings),
]


class MissingDescriptionError(ValueError):
    """A setting without a description: the reference would not say what it does."""


def _default(field: FieldInfo) -> str:
    value: Any = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{value:g}`"
    return f"`{value}`"


def _prefix(model: type[BaseSettings]) -> str:
    return str(model.model_config.get("env_prefix", ""))


def rows() -> list[tuple[str, str, str, str]]:
    """(variable, default, service, meaning) for every setting, common ones first."""
    common = set(CommonSettings.model_fields)
    found: list[tuple[str, str, str, str]] = []
    for who, model in WHO:
        for name, field in model.model_fields.items():
            if model is not CommonSettings and name in common:
                continue
            if not field.description:
                raise MissingDescriptionError(f"{model.__name__}.{name} has no description")
            variable = f"`{_prefix(model)}{name.upper()}`"
            found.append((variable, _default(field), who, field.description))
    return found


def table() -> str:
    lines = ["| variable | default | service | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| {v} | {d} | {w} | {m} |" for v, d, w, m in rows()]
    return "\n".join(lines)


def section() -> str:
    return f"{START}\n{table()}\n{END}"


def replace_in(text: str) -> str:
    """`text` with the part between the markers replaced by the current table."""
    before, found, rest = text.partition(START)
    if not found:
        raise ValueError(f"no {START!r} marker")
    _, found, after = rest.partition(END)
    if not found:
        raise ValueError(f"no {END!r} marker")
    return before + section() + after


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.settings_reference")
    parser.add_argument("--write", type=Path, help="replace the table in this file (the README)")
    args = parser.parse_args()
    if args.write is None:
        print(table())
        return
    path: Path = args.write
    path.write_text(replace_in(path.read_text(encoding="utf-8")), encoding="utf-8")


if __name__ == "__main__":
    main()
