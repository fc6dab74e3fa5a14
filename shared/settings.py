"""Settings read from `CQRS_*` environment variables, in one place, cast to types.

A bad value fails at start-up with the variable named in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Settings both services read."""

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool | None = Field(default=None, description="JSON logs; default: when not a TTY")
    prefetch: int = Field(default=64, ge=1, le=10_000)
    # OpenTelemetry (the `tracing` extra); the exporter reads the standard OTEL_* variables.
    tracing_enabled: bool = False


class CommandServiceSettings(CommonSettings):
    """Settings of the command service."""

    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/cqrs"
    # Migrations run through this one when set (the schema owner), so that the service's own
    # role needs no DDL rights.
    postgres_migration_dsn: str | None = None
    postgres_pool_size: int = Field(default=10, ge=1, le=200)
    command_partitions: int = Field(default=4, ge=1, le=256)
    max_message_bytes: int = Field(default=65_536, ge=256)
    concurrency_retries: int = Field(default=5, ge=0, le=100)
    snapshot_every: int = Field(default=100, ge=0, description="0 disables snapshots")
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    relay_poll_seconds: float = Field(default=1.0, gt=0)
    # The operational endpoint (/healthz, /readyz, /status, /metrics); port 0 picks a free one.
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8001, ge=0, le=65_535)


class QueryServiceSettings(CommonSettings):
    """Settings of the query service (projector and HTTP API)."""

    mongo_url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    mongo_db: str = "cqrs"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65_535)
    api_token: SecretStr | None = Field(
        default=None,
        description="bearer token the HTTP API requires (not on /healthz, /readyz, /metrics, docs)",
    )
    api_token_file: Path | None = Field(
        default=None, description="a file holding the API token, read at start (stripped)"
    )

    @model_validator(mode="before")
    @classmethod
    def _read_api_token_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("api_token_file") in (None, ""):
            return data
        if data.get("api_token") is not None:
            raise ValueError("set CQRS_API_TOKEN or CQRS_API_TOKEN_FILE, not both")
        path = Path(data["api_token_file"])
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"CQRS_API_TOKEN_FILE: cannot read {path}: {e.strerror}") from e
        return {**data, "api_token": token}

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would make "Authorization: Bearer " a valid credential.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("the API token is empty")
        return token

    projector_partitions: int = Field(default=4, ge=1, le=256)
    run_projector: bool = True
    run_api: bool = True
    # An event ahead of a missing one is retried this often, this far apart, then parked.
    projector_gap_attempts: int = Field(default=5, ge=1, le=1_000)
    projector_gap_delay_seconds: float = Field(default=0.2, ge=0, le=60)
    projector_rebalance_seconds: float = Field(
        default=5.0, ge=0, description="how often replicas even out partitions; 0: never"
    )
    read_wait_seconds: float = Field(
        default=5.0, ge=0, le=60, description="longest wait for min_version / min_position"
    )
    readyz_max_lag: int = Field(
        default=1_000,
        ge=0,
        description="events waiting in the partition queues before /readyz fails",
    )
    rebuild_batch_size: int = Field(default=500, ge=1, le=10_000)
    rebuild_max_rounds: int = Field(default=20, ge=1, le=1_000)
    rebuild_start_timeout_seconds: float = Field(default=60.0, gt=0)
    rebuild_idle_timeout_seconds: float = Field(default=60.0, gt=0)
    rebuild_retire_seconds: float = Field(
        default=10.0, ge=0, description="grace before the replaced generation is dropped"
    )


class CliSettings(CommonSettings):
    """Settings of the `cqrs` command-line tool: where the two services answer over HTTP."""

    query_url: str = "http://127.0.0.1:8000"
    command_url: str = Field(
        default="http://127.0.0.1:8001", description="the command service's status endpoint"
    )
    api_token: str | None = Field(
        default=None, repr=False, description="sent as `Authorization: Bearer` to the query API"
    )
