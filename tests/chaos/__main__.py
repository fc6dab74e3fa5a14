"""`python -m tests.chaos`: the real pair under load while faults are injected, then checks.

Runs 2 command-service and 2 query-service processes against RabbitMQ, PostgreSQL and the
MongoDB server, each reached through a TCP proxy that the run can cut (so an outage hits only
this run's processes, never the machine's servers). A driver sends a bounded load of mixed
commands (opens, deposits, withdrawals, transfers, some invalid, some re-sent), while a
schedule injects faults: SIGKILL and restart of a service process, and a few seconds without
the broker, the database or the MongoDB server. Then it waits for quiescence and verifies:

- money is conserved, and no transfer is left half-way;
- no command id has two event sets, and every stream's versions are gap-free;
- every account and transfer read model equals a replay of the event store;
- no message is left in or unacked on any queue;
- no process died except those the run killed.

It prints a table and exits non-zero when a check fails. Addresses come from the
`CQRS_TEST_*` variables, as for the tests (scripts/chaos sets them).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import httpx

from command_service.adapters.migrations import migrate_schema
from command_service.adapters.postgres_event_store import read_all
from shared import topology
from shared.amqp import broker_login
from shared.client import (
    BrokerUnavailableError,
    CommandClient,
    CommandClientError,
    CommandTimeoutError,
    envelope_for,
)
from shared.ledger import (
    DepositMoney,
    FreezeAccount,
    OpenAccount,
    RequestTransfer,
    UnfreezeAccount,
    WithdrawMoney,
)
from shared.messages import Command, CommandEnvelope, Reply
from tests.tcp_proxy import TcpProxy, through

# broker-close: RabbitMQ itself closes every connection of the run's vhost (CONNECTION_FORCED,
# what clients see when a node restarts); the -outage faults cut the TCP link for a while;
# database-blackhole silently stops one command replica's link to PostgreSQL (no reset, sockets
# kept open) for longer than the leader timeout, so its leadership must pass to the other.
FAULTS = (
    "kill-command",
    "kill-query",
    "broker-outage",
    "database-outage",
    "mongo-outage",
    "broker-close",
    "database-blackhole",
)
# The command replicas' leader timeout in the run, short so a blackhole outlasts it.
LEADER_TIMEOUT_SECONDS = 6


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def die_with_parent() -> None:
    """In the child: be killed when the run dies, so no service outlives it (Linux)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    name: str
    module: str
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    killed: int = 0

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", self.module],
                env=self.env,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
            )

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.killed += 1

    @property
    def crashed(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None


@dataclass
class Tally:
    sent: int = 0
    invalid_sent: int = 0
    resent: int = 0
    no_reply: int = 0
    # Any other error of the client SDK, by name (the broker refusing a command, say).
    client_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)


class Driver:
    """Sends a bounded, mixed load of commands and remembers what came back."""

    def __init__(self, client: CommandClient, amqp_url: str, tally: Tally, seed: int) -> None:
        self.client = client
        self.amqp_url = amqp_url
        self.tally = tally
        self.random = random.Random(seed)
        self.accounts: list[uuid.UUID] = []
        self.transfers: list[uuid.UUID] = []
        self.sent: list[tuple[CommandEnvelope, str]] = []

    def next_command(self) -> tuple[Command, uuid.UUID]:
        pick = self.random.random()
        if len(self.accounts) < 10 or pick < 0.1:
            account = uuid.uuid4()
            self.accounts.append(account)
            deposit = self.random.choice([0, 1000, 5000])
            return OpenAccount(
                owner_id=f"owner-{len(self.accounts) % 7}", currency="EUR", initial_deposit=deposit
            ), account
        account = self.random.choice(self.accounts)
        amount = self.random.randint(1, 800)
        if pick < 0.4:
            return DepositMoney(amount=amount), account
        if pick < 0.65:
            return WithdrawMoney(amount=amount), account
        if pick < 0.68:
            return FreezeAccount(), account
        if pick < 0.72:
            return UnfreezeAccount(), account
        other = self.random.choice(self.accounts)
        if other == account:
            return DepositMoney(amount=amount), account
        transfer = uuid.uuid4()
        self.transfers.append(transfer)
        return RequestTransfer(
            from_account_id=account, to_account_id=other, amount=amount
        ), transfer

    async def send_one(self) -> None:
        roll = self.random.random()
        if roll < 0.05 and self.sent:
            envelope, aggregate_type = self.random.choice(self.sent)
            self.tally.resent += 1
        elif roll < 0.1:
            await self.send_invalid()
            return
        else:
            command, aggregate_id = self.next_command()
            envelope = envelope_for(command, aggregate_id)
            aggregate_type = command.aggregate_type
            self.sent.append((envelope, aggregate_type))
        self.tally.sent += 1
        try:
            reply = await self.client.send(envelope, aggregate_type, timeout=30)
        except (CommandTimeoutError, BrokerUnavailableError):
            self.tally.no_reply += 1
            return
        except CommandClientError as e:
            self.tally.client_errors[type(e).__name__] += 1
            return
        self.record(reply)

    def record(self, reply: Reply) -> None:
        self.tally.statuses[reply.status] += 1
        if reply.error is not None:
            self.tally.reasons[reply.error.code] += 1

    async def send_invalid(self) -> None:
        body = self.random.choice(
            [
                b"{not json",
                b'{"type": "Teleport", "aggregate_id": "' + str(uuid.uuid4()).encode() + b'"}',
                json.dumps(
                    {
                        "type": "DepositMoney",
                        "aggregate_id": str(uuid.uuid4()),
                        "payload": {"amount": -5},
                    }
                ).encode(),
            ]
        )
        self.tally.sent += 1
        self.tally.invalid_sent += 1
        try:
            connection = await aio_pika.connect(self.amqp_url)
            async with connection:
                channel = await connection.channel()
                exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
                await exchange.publish(aio_pika.Message(body), routing_key="account.Invalid")
        except aio_pika.exceptions.CONNECTION_EXCEPTIONS as e:  # a fault while sending it
            self.tally.client_errors[f"invalid not sent: {type(e).__name__}"] += 1

    async def run(self, seconds: float, rate: float, concurrency: int = 8) -> None:
        deadline = time.monotonic() + seconds
        slots = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one() -> None:
            async with slots:
                if time.monotonic() >= deadline:
                    return  # offered while the system was behind: dropped, never sent
                with contextlib.suppress(ConnectionError, aio_pika.exceptions.AMQPException):
                    await self.send_one()

        while time.monotonic() < deadline:
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)


class Chaos:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.tally = Tally()
        self.amqp = os.environ["CQRS_TEST_AMQP_URL"]
        self.pg_server = os.environ["CQRS_TEST_POSTGRES_DSN"]
        self.mongo = os.environ["CQRS_TEST_MONGO_URL"]
        self.database = f"cqrs_chaos_{uuid.uuid4().hex[:8]}"
        self.dsn = with_path(self.pg_server, f"/{self.database}")
        self.proxies: dict[str, TcpProxy] = {}
        self.processes: list[Process] = []
        self.api_ports: list[int] = []

    async def setup(self) -> None:
        admin = await asyncpg.connect(self.pg_server)
        await admin.execute(f'CREATE DATABASE "{self.database}"')
        await admin.close()
        await migrate_schema(self.dsn)
        await self.reset_broker()
        # One database link per command replica, so one of them can be cut off alone.
        links = [("broker", self.amqp), ("database-0", self.dsn), ("database-1", self.dsn)]
        for name, url in [*links, ("mongo", self.mongo)]:
            parts = urlsplit(url)
            proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0)
            await proxy.start()
            self.proxies[name] = proxy
        common = {
            **os.environ,
            "CQRS_LOG_JSON": "true",
            "CQRS_RELAY_POLL_SECONDS": "0.5",
            "CQRS_LEADER_TIMEOUT_SECONDS": str(LEADER_TIMEOUT_SECONDS),
            "CQRS_AMQP_URL": through(self.proxies["broker"], self.amqp),
        }
        for index in range(2):
            self.processes.append(
                Process(
                    f"command-{index}",
                    "command_service",
                    {
                        **common,
                        "CQRS_POSTGRES_DSN": through(self.proxies[f"database-{index}"], self.dsn),
                        "CQRS_COMMAND_PARTITIONS": "4",
                        "CQRS_HTTP_PORT": "0",  # two replicas on one host
                        # The driver's login sends for owners of every name: privileged, as
                        # a service's login is; the policy stays on (anonymous is refused).
                        "CQRS_PRIVILEGED_USERS": broker_login(self.amqp) or "",
                    },
                    self.folder / f"command-{index}.log",
                )
            )
        for index in range(2):
            port = free_port()
            self.api_ports.append(port)
            self.processes.append(
                Process(
                    f"query-{index}",
                    "query_service",
                    {
                        **common,
                        "CQRS_MONGO_URL": through(self.proxies["mongo"], self.mongo),
                        "CQRS_MONGO_DB": self.database,
                        "CQRS_HTTP_PORT": str(port),
                        "CQRS_PROJECTOR_PARTITIONS": "4",
                    },
                    self.folder / f"query-{index}.log",
                )
            )
        for process in self.processes:
            process.start()
        await self.wait_ready()

    async def reset_broker(self) -> None:
        from tests.conftest import reset_broker

        await reset_broker(self.amqp)

    async def wait_ready(self, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout), httpx.AsyncClient() as http:
            for port in self.api_ports:
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
            while not await self.consumed(topology.command_partition_queue(0)):
                await asyncio.sleep(0.2)

    async def consumed(self, queue: str) -> bool:
        connection = await aio_pika.connect(self.amqp)
        async with connection:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelClosed):
                declared = await channel.declare_queue(queue, passive=True)
                return bool(declared.declaration_result.consumer_count)
        return False

    async def faults(self, seconds: float, interval: float) -> None:
        deadline = time.monotonic() + seconds
        schedule = iter(FAULTS * 1000)
        await asyncio.sleep(interval)
        while time.monotonic() + 3 < deadline:
            fault = next(schedule)
            self.tally.faults[fault] += 1
            if fault.startswith("kill-"):
                kind = fault.removeprefix("kill-")
                victim = random.choice([p for p in self.processes if p.name.startswith(kind)])
                victim.kill()
                await asyncio.sleep(1)
                victim.start()
            elif fault == "broker-close":
                await self.close_broker_connections()
            elif fault == "database-blackhole":
                proxy = self.proxies[f"database-{random.randrange(2)}"]
                await proxy.blackhole()
                await asyncio.sleep(self.args.blackhole_seconds)
                await proxy.restore()
            else:
                name = fault.removesuffix("-outage")
                proxies = [p for n, p in self.proxies.items() if n.startswith(name)]
                for proxy in proxies:
                    await proxy.cut()
                await asyncio.sleep(self.args.outage_seconds)
                for proxy in proxies:
                    await proxy.restore()
            print(f"  {time.strftime('%H:%M:%S')} fault injected: {fault}", flush=True)
            await asyncio.sleep(interval)

    async def close_broker_connections(self) -> None:
        vhost = urlsplit(self.amqp).path.lstrip("/") or "/"
        await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "chaos: broker-close"],
            capture_output=True,
            check=True,
        )

    async def quiesce(self, timeout: float) -> float | None:
        """Seconds until every queue is empty and every read model caught up with the store."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if await self.queues_drained() and await self.read_models_match(report=False):
                return time.monotonic() - started
            await asyncio.sleep(2)
        print(f"  not quiet after {timeout:.0f} s; queues: {await self.queue_counts()}")
        return None

    async def queue_counts(self) -> dict[str, tuple[int, int]]:
        vhost = urlsplit(self.amqp).path.lstrip("/") or "/"
        out = subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                vhost,
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        counts = {}
        for line in out.splitlines():
            name, ready, unacked = line.split("\t")
            if name.startswith(("cqrs.commands.p", "cqrs.projector.p", "cqrs.replay.requests")):
                counts[name] = (int(ready), int(unacked))
        return counts

    async def queues_drained(self) -> bool:
        return all(c == (0, 0) for c in (await self.queue_counts()).values())

    async def stored(self) -> list[Any]:
        connection = await asyncpg.connect(self.dsn)
        try:
            await connection.set_type_codec(
                "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
            return await read_all(connection, 0, 10**7)
        finally:
            await connection.close()

    def replay(self, events: list[Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        accounts: dict[str, dict[str, Any]] = {}
        transfers: dict[str, str] = {}
        for e in events:
            key = str(e.stream_id)
            if e.aggregate_type == "transfer":
                transfers[key] = {
                    "TransferRequested": "pending",
                    "TransferCompleted": "completed",
                    "TransferFailed": "failed",
                }[e.type]
                continue
            account = accounts.setdefault(
                key, {"balance": 0, "status": "open", "version": 0, "pending": set()}
            )
            account["version"] = e.version
            amount = e.data.get("amount", 0)
            match e.type:
                case "MoneyDeposited" | "MoneyCreditedFromTransfer":
                    account["balance"] += amount
                case "MoneyWithdrawn":
                    account["balance"] -= amount
                case "MoneyDebitedForTransfer":
                    account["balance"] -= amount
                    account["pending"].add(e.data["transfer_id"])
                case "TransferDebitRefunded":
                    account["balance"] += amount
                    account["pending"].discard(e.data["transfer_id"])
                case "TransferDebitSettled":
                    account["pending"].discard(e.data["transfer_id"])
                case "AccountFrozen":
                    account["status"] = "frozen"
                case "AccountUnfrozen":
                    account["status"] = "open"
                case "AccountClosed":
                    account["status"] = "closed"
        return accounts, transfers

    async def read_models_match(self, report: bool) -> bool:
        accounts, transfers = self.replay(await self.stored())
        mismatches: list[str] = []
        slots = asyncio.Semaphore(16)
        base_url = f"http://127.0.0.1:{self.api_ports[0]}"
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:

            async def account(account_id: str, expected: dict[str, Any]) -> None:
                async with slots:
                    response = await http.get(f"/accounts/{account_id}")
                got = response.json() if response.status_code == 200 else {}
                wanted = (expected["balance"], expected["status"], expected["version"])
                if (got.get("balance"), got.get("status"), got.get("version")) != wanted:
                    mismatches.append(f"account {account_id}: read model {got}, replay {wanted}")

            async def transfer(transfer_id: str, status: str) -> None:
                async with slots:
                    response = await http.get(f"/transfers/{transfer_id}")
                got = response.json().get("status") if response.status_code == 200 else None
                if got != status:
                    mismatches.append(f"transfer {transfer_id}: read model {got}, replay {status}")

            try:
                await asyncio.gather(
                    *(account(i, e) for i, e in accounts.items()),
                    *(transfer(i, s) for i, s in transfers.items()),
                )
            except httpx.HTTPError as e:
                mismatches.append(f"query API: {e!r}")
        if report:
            for line in mismatches[:5]:
                print(f"  {line}")
        return not mismatches

    async def checks(self) -> dict[str, bool]:
        events = await self.stored()
        accounts, transfers = self.replay(events)
        deposits = sum(e.data["amount"] for e in events if e.type == "MoneyDeposited")
        withdrawals = sum(e.data["amount"] for e in events if e.type == "MoneyWithdrawn")
        by_command: dict[str, list[int]] = collections.defaultdict(list)
        streams: dict[str, list[int]] = collections.defaultdict(list)
        for e in events:
            by_command[e.metadata["causation_id"]].append(e.position)
            streams[str(e.stream_id)].append(e.version)
        counts = await self.queue_counts()
        return {
            "money conserved": sum(a["balance"] for a in accounts.values())
            == deposits - withdrawals
            and all(a["balance"] >= 0 for a in accounts.values()),
            "no transfer left half-way": all(not a["pending"] for a in accounts.values())
            and all(s != "pending" for s in transfers.values()),
            "one event set per command id": all(
                max(p) - min(p) + 1 == len(p) for p in by_command.values()
            ),
            "versions gap-free": all(v == list(range(1, len(v) + 1)) for v in streams.values()),
            "read models equal a replay": await self.read_models_match(report=True),
            "no message left unacked": all(c == (0, 0) for c in counts.values()),
            "no unplanned crash": not any(p.crashed for p in self.processes),
        }

    async def dead_lettered(self) -> int:
        connection = await aio_pika.connect(self.amqp)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
            return queue.declaration_result.message_count or 0

    async def teardown(self) -> None:
        for process in self.processes:
            if process.popen is not None and process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            if process.popen is not None:
                try:
                    process.popen.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.popen.kill()
        for proxy in self.proxies.values():
            await proxy.cut()
        await self.reset_broker()
        admin = await asyncpg.connect(self.pg_server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        await admin.close()


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def dump_tasks() -> None:
    """SIGUSR1: print where every task waits, for a run that seems stuck."""
    seen = set()
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        key = tuple((f.f_code.co_filename, f.f_lineno) for f in frames)
        if key not in seen:
            seen.add(key)
            task.print_stack()


async def main(args: argparse.Namespace) -> int:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    folder = Path(tempfile.mkdtemp(prefix="cqrs-chaos-"))
    chaos = Chaos(args, folder)
    started = time.monotonic()
    await chaos.setup()
    try:
        async with await CommandClient.connect(chaos.amqp) as client:
            driver = Driver(client, chaos.amqp, chaos.tally, args.seed)
            print(
                f"chaos: {args.duration:.0f} s of load at {args.rate}/s, a fault every "
                f"{args.fault_interval:.0f} s; logs in {folder}",
                flush=True,
            )
            await asyncio.gather(
                driver.run(args.duration, args.rate),
                chaos.faults(args.duration, args.fault_interval),
            )
        print("  load and faults over; waiting for quiescence", flush=True)
        quiet_after = await chaos.quiesce(args.quiesce_seconds)
        results = await chaos.checks()
        events = await chaos.stored()
        tally = chaos.tally
        rows: list[tuple[str, object]] = [
            ("commands sent", tally.sent),
            ("  of them invalid (no reply expected)", tally.invalid_sent),
            ("  of them re-sent duplicates", tally.resent),
            ("accepted", tally.statuses["accepted"]),
            ("rejected", tally.statuses["rejected"]),
            *((f"  {code}", n) for code, n in sorted(tally.reasons.items())),
            ("duplicates suppressed (status duplicate)", tally.statuses["duplicate"]),
            ("no reply within 30 s (outage)", tally.no_reply),
            *((f"  client error {name}", n) for name, n in sorted(tally.client_errors.items())),
            ("dead-lettered", await chaos.dead_lettered()),
            ("events stored", len(events)),
            (
                "events projected (account versions)",
                sum(a["version"] for a in chaos.replay(events)[0].values()),
            ),
            ("faults injected", sum(tally.faults.values())),
            *((f"  {fault}", n) for fault, n in sorted(tally.faults.items())),
            ("quiet after the load (s)", "never" if quiet_after is None else round(quiet_after)),
            ("run time (s)", round(time.monotonic() - started)),
        ]
        print("\n" + table(rows))
        print(
            "\nchecks:\n"
            + table([(name, "ok" if ok else "FAILED") for name, ok in results.items()])
        )
        return 0 if all(results.values()) else 1
    finally:
        await chaos.teardown()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=60, help="seconds of load and faults")
    parser.add_argument("--rate", type=float, default=40, help="commands per second offered")
    parser.add_argument("--fault-interval", type=float, default=6, help="seconds between faults")
    parser.add_argument("--outage-seconds", type=float, default=3)
    parser.add_argument(
        "--blackhole-seconds",
        type=float,
        default=LEADER_TIMEOUT_SECONDS + 4,
        help="how long one replica's database link is silently cut",
    )
    parser.add_argument("--quiesce-seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
