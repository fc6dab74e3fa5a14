"""Who may send which command: the framework's rules, then the command's domain's policy.

With authorization on (`CQRS_AUTHORIZATION=on`), for every command after its aggregate is
loaded: a process manager's step is allowed (it follows from an event whose command was
allowed); an anonymous command (no AMQP `user_id`) is refused; a privileged login
(`CQRS_PRIVILEGED_USERS`) may send anything; any other login is asked to the policy of the domain
whose aggregate the command targets, and refused when that domain has none.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from command_service.model.aggregate import Aggregate
from command_service.model.authorization import (
    Actor,
    AggregateLoader,
    AuthorizationPolicy,
    Forbidden,
)
from command_service.model.domain import CommandDomain
from shared.messages import Command


def authorization(
    domains: Sequence[CommandDomain], *, privileged: Collection[str]
) -> AuthorizationPolicy:
    """The policy of a service running `domains` (see the module)."""
    by_type = {
        aggregate_type: domain.policy
        for domain in domains
        for aggregate_type in domain.aggregate_types
    }
    privileged = frozenset(privileged)

    async def authorize(
        actor: Actor, command: Command, aggregate: Aggregate, load: AggregateLoader
    ) -> None:
        if actor.kind == "process":
            return
        if actor.kind != "user" or actor.name is None:
            raise Forbidden(
                "anonymous commands are refused: publish with the AMQP user_id property set "
                "to your login"
            )
        if actor.name in privileged:
            return
        policy = by_type.get(aggregate.aggregate_type)
        if policy is None:
            raise Forbidden(f"{actor.name} may not send {command.type_name()}")
        await policy(actor, command, aggregate, load)

    return authorize
