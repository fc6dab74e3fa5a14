"""Given/when/then fixtures for aggregates: given these events, when this command, then these
events or this rejection. No I/O; use them in your domain's unit tests.

    scenario(Account).given(AccountOpened(owner_id="o", currency="EUR")) \\
        .when(WithdrawMoney(amount=5)).then_rejects("insufficient_funds")
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from command_service.model.aggregate import Aggregate, DomainError
from shared.messages import Command, Event

A = TypeVar("A", bound=Aggregate)


class ScenarioFailedError(AssertionError):
    """The aggregate did not do what the scenario expected."""


@dataclass
class Scenario(Generic[A]):
    """One given/when/then run against a fresh aggregate of `aggregate_class`."""

    aggregate_class: type[A]
    aggregate_id: uuid.UUID = field(default_factory=uuid.uuid4)
    history: list[Event] = field(default_factory=list)
    command: Command | None = None

    def given(self, *events: Event) -> Scenario[A]:
        self.history.extend(events)
        return self

    def when(self, command: Command) -> Scenario[A]:
        self.command = command
        return self

    def _decide(self) -> Sequence[Event]:
        if self.command is None:
            raise ScenarioFailedError("the scenario has no `when` command")
        aggregate = self.aggregate_class.rehydrate(self.aggregate_id, self.history)
        return aggregate.decide(self.command)

    def then(self, *expected: Event) -> A:
        """Assert the command yields exactly `expected`; return the aggregate after them."""
        try:
            produced = list(self._decide())
        except DomainError as e:
            raise ScenarioFailedError(f"expected events, got rejection {e.code}: {e}") from e
        if produced != list(expected):
            raise ScenarioFailedError(f"expected {list(expected)!r}, got {produced!r}")
        return self.aggregate_class.rehydrate(self.aggregate_id, [*self.history, *produced])

    def then_rejects(self, code: str) -> DomainError:
        """Assert the command is rejected with `code`; return the error."""
        try:
            produced = self._decide()
        except DomainError as e:
            if e.code != code:
                raise ScenarioFailedError(f"expected rejection {code}, got {e.code}: {e}") from e
            return e
        raise ScenarioFailedError(f"expected rejection {code}, got events {list(produced)!r}")


def scenario(aggregate_class: type[A]) -> Scenario[A]:
    return Scenario(aggregate_class)
