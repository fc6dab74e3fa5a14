"""`CQRS_API_TOKEN` / `CQRS_API_TOKEN_FILE`: one or the other, never empty, the file stripped."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from query_service.settings import QueryServiceSettings

TOKEN = "s3cret-token-for-tests"


class TestTokenSettings:
    def test_the_token_file_is_read_and_stripped(self, tmp_path: Path) -> None:
        secret = tmp_path / "token"
        secret.write_text(f"  {TOKEN}\n")

        settings = QueryServiceSettings(api_token_file=secret)

        assert settings.api_token is not None
        assert settings.api_token.get_secret_value() == TOKEN
        assert TOKEN not in repr(settings)

    def test_the_token_file_is_read_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        secret = tmp_path / "token"
        secret.write_text(TOKEN)
        monkeypatch.setenv("CQRS_API_TOKEN_FILE", str(secret))

        settings = QueryServiceSettings()

        assert settings.api_token is not None
        assert settings.api_token.get_secret_value() == TOKEN

    def test_token_and_token_file_together_are_refused(self, tmp_path: Path) -> None:
        secret = tmp_path / "token"
        secret.write_text(TOKEN)

        with pytest.raises(ValidationError, match="CQRS_API_TOKEN or CQRS_API_TOKEN_FILE"):
            QueryServiceSettings(api_token=TOKEN, api_token_file=secret)

    def test_a_missing_token_file_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="CQRS_API_TOKEN_FILE: cannot read"):
            QueryServiceSettings(api_token_file=tmp_path / "absent")

    @pytest.mark.parametrize("content", ["", "  \n"])
    def test_an_empty_token_is_refused(self, tmp_path: Path, content: str) -> None:
        secret = tmp_path / "token"
        secret.write_text(content)

        with pytest.raises(ValidationError, match="the API token is empty"):
            QueryServiceSettings(api_token_file=secret)
        with pytest.raises(ValidationError, match="the API token is empty"):
            QueryServiceSettings(api_token=content)
