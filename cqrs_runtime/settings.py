"""Settings read from `CQRS_*` environment variables: what every part reads, the base of each
part's own settings (`command_service.settings`, `query_service.settings`, `cqrs_cli.settings`).

A bad value fails at start-up with the variable named in the error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Settings both services read."""

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore", frozen=True)

    amqp_url: str = Field(
        default="amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ (`amqps://` for TLS); a user of the service's own role",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="`DEBUG`, `INFO`, `WARNING` or `ERROR`"
    )
    log_json: bool | None = Field(
        default=None,
        description="JSON lines (`true`) or console output (`false`); unset: JSON when stderr "
        "is not a terminal",
    )
    prefetch: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="unacknowledged messages per consumer channel: the in-flight work, and so "
        "the memory, a flood can take",
    )
    domains: str = Field(
        default="ledger",
        description="the domains this service runs, comma-separated: a bare name is one shipped "
        "with the services (`ledger`), a dotted name a package of your own with modules "
        '`contracts`, `command` and `query` (see "Adding your own domain")',
    )
    tracing_enabled: bool = Field(
        default=False,
        description="OpenTelemetry tracing (the `tracing` extra); the exporter reads the "
        "standard `OTEL_*` variables",
    )

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names:
            raise ValueError("name at least one domain")
        if len(set(names)) != len(names):
            raise ValueError("a domain is named twice")
        return ",".join(names)

    @property
    def domain_names(self) -> list[str]:
        return self.domains.split(",")
