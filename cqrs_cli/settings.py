"""The `cqrs` tool's settings (`CQRS_*` environment variables)."""

from __future__ import annotations

from pydantic import Field

from cqrs_runtime.settings import CommonSettings


class CliSettings(CommonSettings):
    """Settings of the `cqrs` command-line tool: where the two services answer over HTTP."""

    query_url: str = Field(default="http://127.0.0.1:8000", description="the query API")
    command_url: str = Field(
        default="http://127.0.0.1:8001", description="the command service's status endpoint"
    )
    api_token: str | None = Field(
        default=None, repr=False, description="sent as `Authorization: Bearer` to the query API"
    )
