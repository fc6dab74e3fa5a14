"""`python -m tests.integration.contend DSN ACCOUNT COUNT`: deposit 1 COUNT times, concurrently.

One of several processes racing on one account through the real event store.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

from command_service.adapters.postgres_event_store import PostgresEventStore, create_pool
from command_service.domains import ledger
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import ConcurrencyError
from command_service.service_layer.handlers import handle_command
from command_service.service_layer.registry import CommandRegistry
from shared.client import envelope_for
from shared.ledger import DepositMoney


class CountingStore(PostgresEventStore):
    """Counts the races this process lost."""

    conflicts = 0

    async def append(self, **kwargs: Any) -> Any:
        try:
            return await super().append(**kwargs)
        except ConcurrencyError:
            self.conflicts += 1
            raise


async def main(dsn: str, account: uuid.UUID, count: int) -> int:
    pool = await create_pool(dsn, 8)
    store, registry = CountingStore(pool), CommandRegistry.from_domains([ledger.domain])
    replies = await asyncio.gather(
        *(
            handle_command(
                envelope_for(DepositMoney(amount=1), account),
                store=store,
                actor=Actor.anonymous(),
                registry=registry,
                concurrency_retries=200,
            )
            for _ in range(count)
        )
    )
    await pool.close()
    statuses = {reply.status for reply in replies}
    print(f"conflicts={store.conflicts} statuses={sorted(statuses)}")
    return 0 if statuses == {"accepted"} else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], uuid.UUID(sys.argv[2]), int(sys.argv[3]))))
