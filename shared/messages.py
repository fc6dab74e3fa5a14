"""Message envelopes: what travels between clients, the command service and the query service."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.text import Identifier, check_payload

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every contract model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Command(Message):
    """The payload of a command. Subclasses name their type and the aggregate type they target."""

    aggregate_type: ClassVar[str]

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


class Event(Message):
    """The data of a domain event. The class name is the event type."""

    schema_version: ClassVar[int] = 1

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


# Versions and positions stay far inside PostgreSQL's bigint and MongoDB's int64.
MAX_COUNTER = 2**62


class CommandMetadata(Message):
    """What a command says about itself. Every string here is an identifier (`shared.text`)."""

    correlation_id: Identifier | None = None
    causation_id: Identifier | None = None
    issued_at: datetime = Field(default_factory=utcnow)
    # What the sender says it is: kept in the contract for compatibility, trusted for nothing.
    # Who sent a command is its broker-verified AMQP `user_id` (stored as each event's `user`).
    user: Identifier | None = None


class CommandEnvelope(Message):
    """A command as published to `cqrs.commands`. `command_id` is the idempotency key."""

    command_id: UUID = Field(default_factory=uuid4)
    type: str = Field(pattern=NAME_PATTERN)
    aggregate_id: UUID
    expected_version: int | None = Field(default=None, ge=0, le=MAX_COUNTER)
    payload: dict[str, Any] = Field(default_factory=dict)
    metadata: CommandMetadata = Field(default_factory=CommandMetadata)

    @field_validator("payload")
    @classmethod
    def _payload_travels(cls, payload: dict[str, Any]) -> dict[str, Any]:
        check_payload(payload)
        return payload


class EventMetadata(Message):
    correlation_id: str | None = None
    causation_id: str | None = None
    schema_version: int = Field(default=1, ge=1)
    # W3C trace context of the command that produced the event; only when tracing was on.
    traceparent: str | None = Field(default=None, max_length=128)


class EventEnvelope(Message):
    """An event as published to the `cqrs.events` exchange."""

    event_id: UUID
    type: str = Field(pattern=NAME_PATTERN)
    aggregate_type: str = Field(pattern=NAME_PATTERN)
    aggregate_id: UUID
    version: int = Field(ge=1)
    position: int = Field(ge=1)
    recorded_at: datetime
    data: dict[str, Any]
    metadata: EventMetadata = Field(default_factory=EventMetadata)

    @property
    def routing_key(self) -> str:
        return f"{self.aggregate_type}.{self.type}"


class ReplyError(Message):
    code: str
    message: str


ReplyStatus = Literal["accepted", "rejected", "duplicate"]


class Reply(Message):
    """The answer to a command, sent to its `reply_to` queue and stored for idempotency."""

    command_id: UUID
    status: ReplyStatus
    aggregate_id: UUID | None = None
    version: int | None = None
    position: int | None = None
    error: ReplyError | None = None


class ReplayRequest(Message):
    """Asks the command service to stream stored events into `reply_queue`.

    Events with `after_position < position <= up_to_position` (default: the newest position when
    the replay starts), optionally only of some aggregate types, in global position order.
    """

    request_id: UUID = Field(default_factory=uuid4)
    reply_queue: str = Field(min_length=1, max_length=255)
    after_position: int = Field(default=0, ge=0)
    up_to_position: int | None = Field(default=None, ge=0)
    aggregate_types: list[str] | None = None


class ReplayProgress(Message):
    """Body of the `ReplayStarted` and `ReplayFinished` messages that frame a replay."""

    request_id: UUID
    total: int
    after_position: int
    up_to_position: int
