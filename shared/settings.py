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
        default=65_536,
        ge=256,
        description="larger commands are dead-lettered, as a copy that keeps the first 4,096 "
        "bytes; keep the broker's `max_message_size` at least twice this (events carry the "
        "command's data)",
    )
    dead_letter_max_messages: int = Field(
        default=100_000,
        ge=1,
        description="dead letters `cqrs.commands.dead` keeps; beyond, the oldest is dropped "
        "(each was refused and answered)",
    )
    dead_letter_max_bytes: int = Field(
        default=134_217_728,
        ge=65_536,
        description="body bytes `cqrs.commands.dead` keeps (128 MiB); beyond, the oldest is "
        "dropped",
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
    leader_timeout_seconds: float = Field(
        default=15.0,
        ge=3,
        le=600,
        description="after a silent network cut, the bound on how long the relay, a process "
        "manager or a partition lease stays with a replica that cannot reach PostgreSQL, and on "
        "how long a silent session may hold a transaction open",
    )
    reply_queue_prefix: str = Field(
        default="cqrs.reply.",
        min_length=1,
        max_length=200,
        description="replies go only to queues named so, server-named ones (`amq.gen-*`) and "
        "direct reply-to; a command with another `reply_to` gets no reply",
    )
    authorization: Literal["owner", "off"] = Field(
        default="owner",
        description="who may send which command, by the sender's broker login (the AMQP "
        "`user_id`): `owner`, a client acts only on accounts it owns, the privileged logins on "
        "any, a command without `user_id` is refused; `off`, anyone sends anything (the sender "
        "is still recorded)",
    )
    privileged_users: str = Field(
        default="cqrs-command,cqrs-admin",
        description="broker logins, comma-separated, that the policy lets send any command "
        "(the service and admin users); empty: none",
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="where `/healthz`, `/readyz`, `/status` and `/metrics` listen",
    )
    http_port: int = Field(
        default=8001, ge=0, le=65_535, description="their port (`0`: a free one)"
    )
    http_header_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="a connection that has not sent a whole request head this long after it "
        "opened (or after its last response) is closed",
    )

    @field_validator("privileged_users")
    @classmethod
    def _logins(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",")]
        return ",".join(name for name in names if name)

    @property
    def privileged(self) -> frozenset[str]:
        """The privileged logins, as a set."""
        return frozenset(name for name in self.privileged_users.split(",") if name)

    @model_validator(mode="after")
    def _leaders_poll_within_their_timeout(self) -> CommandServiceSettings:
        if self.relay_poll_seconds * 3 > self.leader_timeout_seconds:
            raise ValueError(
                "CQRS_RELAY_POLL_SECONDS must be at most a third of CQRS_LEADER_TIMEOUT_SECONDS: "
                "a leader that polls less often would lose its lock while healthy"
            )
        return self

    @model_validator(mode="after")
    def _a_dead_letter_fits_its_queue(self) -> CommandServiceSettings:
        # A dead letter's body is at most the command limit (a longer one is cut to a prefix);
        # one larger than the queue's byte bound would only push everything else out.
        if self.dead_letter_max_bytes < self.max_message_bytes:
            raise ValueError(
                "CQRS_DEAD_LETTER_MAX_BYTES must be at least CQRS_MAX_MESSAGE_BYTES, or one "
                "dead letter would not fit in the queue"
            )
        return self


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
        description="requests served at once by one replica, the probes not counted; more get "
        "503 at once",
    )
    http_header_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="a connection that has not sent a whole request head this long after it "
        "opened (or after its last response) is closed",
    )
    http_max_body_bytes: int = Field(
        default=16_384,
        ge=0,
        le=16_777_216,
        description="a larger request body gets 413 before any route or token check reads it",
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
    parked_max_messages: int = Field(
        default=100_000,
        ge=1,
        description="events `cqrs.projector.parked` holds; beyond, the broker refuses more and "
        "the projector keeps the event in its partition until there is room",
    )
    parked_max_bytes: int = Field(
        default=134_217_728,
        ge=1_048_576,
        description="body bytes `cqrs.projector.parked` holds (128 MiB), the same way; at "
        "least 1 MiB, the largest event body the projector reads, so any event can be parked",
    )
    parked_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="wait before an event the full parked queue refused is requeued and tried "
        "again",
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
    read_wait_max_waiters: int = Field(
        default=128,
        ge=0,
        description="reads waiting for `min_version` / `min_position` at once; more get 503 "
        "at once (`0`: a read whose version is not there yet is refused); below "
        "`CQRS_HTTP_MAX_CONCURRENCY`",
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
        if self.read_wait_max_waiters >= self.http_max_concurrency:
            raise ValueError(
                "CQRS_READ_WAIT_MAX_WAITERS must be below CQRS_HTTP_MAX_CONCURRENCY, or reads "
                "waiting for their version could take every request slot"
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
