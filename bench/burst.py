"""`python -m bench.burst`: memory under a burst, the flood the services cannot keep up with.

One replica of each service; commands are published straight to the broker as fast as it takes
them, with nobody waiting for replies, so they pile up in the partition queues. A bounded
service holds at most `prefetch` messages per partition in memory whatever the backlog, so its
peak RSS must not grow with the burst: the burst runs at two sizes and the table compares the
peak RSS above the idle baseline. Every fifth message is a near-maximum body that is refused
(malformed, ~60 KB), so large messages pass through memory too.

The servers come from the `CQRS_BENCH_*` variables, as for `python -m bench` (`scripts/bench
--burst` sets them up and runs this).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
from aio_pika.abc import FieldValue

from bench.config import Servers, plan_for
from bench.infra import (
    QueueProbe,
    command_queues,
    fresh_database,
    fresh_mongo_database,
    projector_queues,
    reset_vhost,
    wait_store_idle,
)
from bench.project import COMMAND_PARTITIONS, PROJECTOR_PARTITIONS, Deployment
from command_service.settings import CommandServiceSettings
from shared import topology
from shared.amqp import broker_login
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount
from shared.messages import CommandEnvelope, CommandMetadata

ACCOUNTS = 100
LARGE_EVERY = 5
MAX_BYTES: int = CommandServiceSettings.model_fields["max_message_bytes"].default
SAMPLE_SECONDS = 0.5


@dataclass
class BurstResult:
    commands: int
    publish_seconds: float = 0.0
    drain_seconds: float = 0.0
    peak_backlog: int = 0
    baseline_mib: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    after_mib: dict[str, float] = field(default_factory=dict)

    def growth(self, service: str) -> float:
        return self.peak_mib[service] - self.baseline_mib[service]


def _message(account: uuid.UUID, index: int, user_id: str | None) -> aio_pika.Message:
    headers: dict[str, FieldValue] = {topology.AGGREGATE_ID_HEADER: str(account)}
    if index % LARGE_EVERY == 0:
        # Refused as malformed after it was read whole: a large body through the consumer.
        return aio_pika.Message(
            body=b"{" + b"x" * (MAX_BYTES - 4096), content_type="application/json", headers=headers
        )
    envelope = CommandEnvelope(
        command_id=uuid.uuid4(),
        type="DepositMoney",
        aggregate_id=account,
        payload=DepositMoney(amount=1).model_dump(mode="json"),
        metadata=CommandMetadata(correlation_id=str(uuid.uuid4())),
    )
    return aio_pika.Message(
        body=envelope.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        user_id=user_id,
        headers=headers,
    )


async def _open_accounts(amqp_url: str) -> list[uuid.UUID]:
    accounts = [uuid.uuid4() for _ in range(ACCOUNTS)]
    async with await CommandClient.connect(amqp_url) as client:
        replies = await asyncio.gather(
            *(
                client.send_command(
                    OpenAccount(owner_id=f"burst-{i % 10}", currency="EUR", initial_deposit=0),
                    account,
                    timeout=60,
                )
                for i, account in enumerate(accounts)
            )
        )
    refused = [r for r in replies if r.status != "accepted"]
    if refused:
        raise RuntimeError(f"opening accounts failed: {refused[0]}")
    return accounts


def _rss_mib(deployment: Deployment) -> dict[str, float]:
    return {
        p.service: round(p.sample_memory().get("VmRSS", 0) / 1024, 1) for p in deployment.processes
    }


async def measure_burst(servers: Servers, commands: int, run_dir: Path) -> BurstResult:
    plan = plan_for(
        quick=False, runs=1, soak_seconds=None, log_level="WARNING", profile=False, replicas=(1,)
    )
    result = BurstResult(commands)
    await reset_vhost(servers.amqp_url)
    async with (
        fresh_database(servers.postgres_dsn) as dsn,
        fresh_mongo_database(servers.mongo_url) as mongo_db,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        deployment = Deployment(servers, plan, 1, dsn, mongo_db, run_dir / f"burst-{commands}")
        probe = await QueueProbe.connect(servers.amqp_url)
        try:
            await deployment.start_queries()
            await deployment.start_commands()
            await deployment.wait_ready(probe, http)
            accounts = await _open_accounts(servers.amqp_url)
            await wait_store_idle(dsn, 60)
            await asyncio.sleep(2.0)
            result.baseline_mib = _rss_mib(deployment)
            result.peak_mib = dict(result.baseline_mib)
            queues = command_queues(COMMAND_PARTITIONS)

            async def sample() -> None:
                while True:
                    for service, mib in _rss_mib(deployment).items():
                        result.peak_mib[service] = max(result.peak_mib[service], mib)
                    backlog = await probe.total_depth(queues)
                    result.peak_backlog = max(result.peak_backlog, backlog)
                    await asyncio.sleep(SAMPLE_SECONDS)

            sampler = asyncio.create_task(sample())
            try:
                started = time.perf_counter()
                connection = await aio_pika.connect(servers.amqp_url)
                login = broker_login(servers.amqp_url)
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
                    for start in range(0, commands, 500):
                        await asyncio.gather(
                            *(
                                exchange.publish(
                                    _message(accounts[i % ACCOUNTS], i, login),
                                    routing_key="account",
                                )
                                for i in range(start, min(start + 500, commands))
                            )
                        )
                result.publish_seconds = time.perf_counter() - started
                await probe.wait_empty(queues, timeout=3600)
                await wait_store_idle(dsn, 600)
                await probe.wait_empty(projector_queues(PROJECTOR_PARTITIONS), timeout=600)
                result.drain_seconds = time.perf_counter() - started
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            result.after_mib = _rss_mib(deployment)
        finally:
            await probe.close()
            await deployment.stop_all()
    return result


def render(results: list[BurstResult]) -> str:
    services = sorted(results[0].baseline_mib)
    lines = [
        "memory under a burst (1 replica each; RSS in MiB; 1 in "
        f"{LARGE_EVERY} messages a ~{(MAX_BYTES - 4096) // 1024} KiB body)",
        "",
        f"  {'burst (commands)':<34}" + "".join(f"{r.commands:>14,}" for r in results),
        f"  {'published in (s)':<34}" + "".join(f"{r.publish_seconds:>14.1f}" for r in results),
        f"  {'peak backlog (messages queued)':<34}"
        + "".join(f"{r.peak_backlog:>14,}" for r in results),
        f"  {'drained in (s)':<34}" + "".join(f"{r.drain_seconds:>14.1f}" for r in results),
    ]
    for service in services:
        for label, values in (
            ("idle", [r.baseline_mib[service] for r in results]),
            ("peak", [r.peak_mib[service] for r in results]),
            ("after", [r.after_mib[service] for r in results]),
            ("peak - idle", [r.growth(service) for r in results]),
        ):
            lines.append(f"  {service + ' ' + label:<34}" + "".join(f"{v:>14.1f}" for v in values))
    small, large = results[0], results[-1]
    lines.append("")
    for service in services:
        ratio = large.commands / small.commands
        lines.append(
            f"  {service}: a {ratio:.0f}x larger burst, peak above idle "
            f"{small.growth(service):.1f} -> {large.growth(service):.1f} MiB"
        )
    return "\n".join(lines)


async def main(sizes: list[int]) -> list[BurstResult]:
    servers = Servers.from_env()
    run_dir = Path("/tmp") / f"cqrs-burst-{int(time.time())}"
    return [await measure_burst(servers, size, run_dir) for size in sizes]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument(
        "--sizes",
        default="2000,8000",
        help="burst sizes, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    return parser.parse_args()


if __name__ == "__main__":
    args = _parse()
    results = asyncio.run(main([int(size) for size in args.sizes.split(",")]))
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
