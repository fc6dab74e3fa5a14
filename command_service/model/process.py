"""The framework's process manager: reacts to events by issuing commands. No I/O here.

A process manager is a pure function of one event to the commands it causes. Each issued
command carries a deterministic id (derived from the process instance and the step), so running
a reaction twice, after a crash or on another replica, issues the same commands and the command
log answers the second run with `duplicate`: a half-finished process is simply run again.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from shared.messages import Command, Event, ReplyError

# Namespace of the deterministic command ids that process managers issue.
PROCESS_NAMESPACE = uuid.UUID("6f1f6c55-2f0e-4c51-9d0b-3c6f2b1f5a10")


def step_id(process: str, instance: uuid.UUID, step: str) -> uuid.UUID:
    return uuid.uuid5(PROCESS_NAMESPACE, f"{process}:{instance}:{step}")


RejectionHandler = Callable[[ReplyError], Sequence["IssuedCommand"]]


@dataclass(frozen=True)
class IssuedCommand:
    """A command a process manager sends, and what to do if it is rejected."""

    aggregate_id: uuid.UUID
    command: Command
    command_id: uuid.UUID
    on_rejected: RejectionHandler | None = None


class ProcessManager(ABC):
    """Subclasses name the `events` they react to and implement `react`."""

    name: ClassVar[str]
    events: ClassVar[tuple[type[Event], ...]]

    @abstractmethod
    def react(self, event: Event, aggregate_id: uuid.UUID) -> Sequence[IssuedCommand]:
        """The commands that `event`, recorded on `aggregate_id`, causes."""
