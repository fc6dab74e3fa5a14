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
    tracing_enabled: bool = Field(
        default=False,
        description="OpenTelemetry tracing (the `tracing` extra); the exporter reads the "
        "standard `OTEL_*` variables",
    )


class CommandServiceSettings(CommonSettings):
    """Settings of the command service."""

    postgres_dsn: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/cqrs",
        description="the event store (schema migrated at start-up)",
    )
    postgres_migration_dsn: str | None = Field(
        default=None,
        description="the schema owner's DSN for migrations, so the service's own role needs no "
        "DDL rights; unset: `CQRS_POSTGRES_DSN`",
    )
    postgres_pool_size: int = Field(default=10, ge=1, le=200, description="connections in the pool")
    command_partitions: int = Field(
        default=4, ge=1, le=256, description="P command queues; every replica must use the same P"
    )
    max_message_bytes: int = Field(
        default=65_536, ge=256, description="larger commands are dead-lettered"
    )
    concurrency_retries: int = Field(
        default=5, ge=0, le=100, description="retries of a lost optimistic-concurrency race"
    )
    snapshot_every: int = Field(
        default=100, ge=0, description="snapshot an aggregate every N versions (`0`: never)"
    )
    command_retry_seconds: float = Field(
        default=30.0,
        gt=0,
        description="how long a command waits in place for an unreachable event store before "
        "it is requeued (and waited for again)",
    )
    relay_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="events per relay / process-manager batch"
    )
    relay_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="poll interval besides LISTEN/NOTIFY, and standby takeover time",
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="where `/healthz`, `/readyz`, `/status` and `/metrics` listen",
    )
    http_port: int = Field(
        default=8001, ge=0, le=65_535, description="their port (`0`: a free one)"
    )


class QueryServiceSettings(CommonSettings):
    """Settings of the query service (projector and HTTP API)."""

    mongo_url: str = Field(
        default="mongodb://127.0.0.1:27017/?directConnection=true",
        description="MongoDB, credentials and TLS options included",
    )
    mongo_db: str = Field(default="cqrs", description="database of the read models")
    http_host: str = Field(default="127.0.0.1", description="where the API listens")
    http_port: int = Field(default=8000, ge=0, le=65_535, description="the API's port")
    http_request_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="a request not answered by then gets 503 and is cancelled; above "
        "`CQRS_READ_WAIT_SECONDS`",
    )
    http_max_concurrency: int = Field(
        default=256,
        ge=1,
        description="requests served at once by one replica; more get 503 at once",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="the bearer token the API requires (not on `/healthz`, `/readyz`, "
        "`/metrics`, the docs); unset: no authentication",
    )
    api_token_file: Path | None = Field(
        default=None,
        description="a file holding the API token, read at start (stripped); not with "
        "`CQRS_API_TOKEN`",
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

    projector_partitions: int = Field(
        default=4, ge=1, le=256, description="P event queues for the projector replicas"
    )
    run_projector: bool = Field(default=True, description="run the projector in this process")
    run_api: bool = Field(default=True, description="run the HTTP API in this process")
    projector_gap_attempts: int = Field(
        default=5,
        ge=1,
        le=1_000,
        description="retries of an event ahead of a missing one before it is parked",
    )
    projector_gap_delay_seconds: float = Field(
        default=0.2, ge=0, le=60, description="the wait between those retries"
    )
    projector_rebalance_seconds: float = Field(
        default=5.0,
        ge=0,
        description="how often replicas even out the partitions (`0`: never)",
    )
    read_wait_seconds: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="longest wait of a read with `min_version` / `min_position`",
    )
    readyz_max_lag: int = Field(
        default=1_000,
        ge=0,
        description="events waiting in the partition queues above which `/readyz` fails",
    )
    rebuild_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="replayed events written per batch"
    )
    rebuild_max_rounds: int = Field(
        default=20,
        ge=1,
        le=1_000,
        description="replay rounds before a rebuild that cannot catch up gives up",
    )
    rebuild_start_timeout_seconds: float = Field(
        default=60.0, gt=0, description="wait for a replay to start"
    )
    rebuild_idle_timeout_seconds: float = Field(
        default=60.0, gt=0, description="wait for a replay's next message"
    )
    rebuild_retire_seconds: float = Field(
        default=10.0, ge=0, description="grace before the replaced generation is dropped"
    )

    @model_validator(mode="after")
    def _requests_outlast_read_waits(self) -> QueryServiceSettings:
        if self.http_request_timeout_seconds <= self.read_wait_seconds:
            raise ValueError(
                "CQRS_HTTP_REQUEST_TIMEOUT_SECONDS must exceed CQRS_READ_WAIT_SECONDS, or every "
                "read that waits for its version would be cut off"
            )
        return self


class CliSettings(CommonSettings):
    """Settings of the `cqrs` command-line tool: where the two services answer over HTTP."""

    query_url: str = Field(default="http://127.0.0.1:8000", description="the query API")
    command_url: str = Field(
        default="http://127.0.0.1:8001", description="the command service's status endpoint"
    )
    api_token: str | None = Field(
        default=None, repr=False, description="sent as `Authorization: Bearer` to the query API"
    )
