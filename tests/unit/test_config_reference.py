"""The README's settings table is the one the settings models give, and every setting has one."""

from __future__ import annotations

from pathlib import Path

from command_service.settings import CommandServiceSettings
from cqrs_cli.settings import CliSettings
from query_service.settings import QueryServiceSettings
from tests import settings_reference as config_reference

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_lists_every_setting_as_the_models_define_it() -> None:
    text = README.read_text(encoding="utf-8")
    assert config_reference.replace_in(text) == text, (
        "README settings table is stale: python -m tests.settings_reference --write README.md"
    )


def test_every_field_of_every_settings_model_is_in_the_table() -> None:
    table = config_reference.table()
    for model in (CommandServiceSettings, QueryServiceSettings, CliSettings):
        for name in model.model_fields:
            assert f"`CQRS_{name.upper()}`" in table, name
