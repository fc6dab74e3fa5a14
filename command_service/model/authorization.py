"""The framework's authorization hook: who sends a command, and the policy that decides on it.

A domain may give the framework a policy, an async function called for every command after
the target aggregate is loaded and before it decides:

    async def authorize(actor, command, aggregate, load) -> None

It returns to allow the command and raises `Forbidden` (or any `DomainError`) to refuse it; the
refusal is the command's answer and is stored like any rejection. `load` reads another
aggregate, read-only, for a decision that depends on it. The framework knows no rule of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar
from uuid import UUID

from command_service.model.aggregate import Aggregate, DomainError
from shared.messages import Command

ActorKind = Literal["user", "process", "anonymous"]
A = TypeVar("A", bound=Aggregate)

FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class Actor:
    """Who a command acts for.

    `user`: a broker login, taken from the AMQP `user_id` property, which RabbitMQ checks
    against the connection's login (the envelope's `metadata.user` is only a claim, and is
    trusted for nothing). `process`: a process manager of this service, named
    `process:<name>`. `anonymous`: a command published without `user_id`.
    """

    name: str | None
    kind: ActorKind

    @classmethod
    def user(cls, login: str) -> Actor:
        return cls(login, "user")

    @classmethod
    def process(cls, name: str) -> Actor:
        return cls(f"process:{name}", "process")

    @classmethod
    def anonymous(cls) -> Actor:
        return cls(None, "anonymous")


class Forbidden(DomainError):
    """The policy refuses the command to this actor: the answer is a `forbidden` rejection."""

    def __init__(self, message: str) -> None:
        super().__init__(FORBIDDEN, message)


class AggregateLoader(Protocol):
    """Reads an aggregate's current state for a policy; never writes."""

    async def __call__(self, aggregate_class: type[A], aggregate_id: UUID, /) -> A | None:
        """The aggregate, or None when no aggregate of that type has that id."""
        ...


AuthorizationPolicy = Callable[[Actor, Command, Aggregate, AggregateLoader], Awaitable[None]]
"""`authorize(actor, command, aggregate, load)`: returns to allow, raises `Forbidden` to refuse."""
