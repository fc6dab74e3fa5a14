"""The command service's settings (`CQRS_*` environment variables), read once at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cqrs_runtime.settings import CommonSettings


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
    command_batch_size: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="commands of one partition decided and stored in one transaction, at most "
        "(and at most `CQRS_PREFETCH`): those delivered already, never waited for; `1`: one at "
        "a time",
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
    authorization: Literal["on", "off"] = Field(
        default="on",
        description="who may send which command, by the sender's broker login (the AMQP "
        "`user_id`): `on`, the privileged logins anything, any other login what its command's "
        "domain's policy allows (the ledger's: a client acts only on accounts it owns), a "
        "command without `user_id` nothing; `off`, anyone sends anything (the sender is still "
        "recorded)",
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
