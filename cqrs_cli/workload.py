"""Load generation: a command mix, and the latency summary of its replies.

Opens, deposits, withdrawals and transfers on many accounts, some hot, and optionally invalid
commands (which the command service rejects and dead-letters). Used by `cqrs load` and by the
benchmark (`bench/`). Bodies are the public command envelope as JSON, built with `json.dumps` so
the client spends little CPU of the cores it shares with the services.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from shared.ledger import ACCOUNT, TRANSFER

CURRENCY = "EUR"
SETUP_DEPOSIT = 1_000_000_000  # large enough that withdrawals and transfers rarely fail
OPEN_DEPOSIT = 1_000_000
OVERDRAFT = 10**12  # the largest amount: a withdrawal of it is rejected (insufficient funds)


@dataclass(frozen=True)
class Mix:
    """Weights of the command types, and how often a command picks a hot account."""

    open_account: float = 0.10
    deposit: float = 0.40
    withdraw: float = 0.30
    transfer: float = 0.20
    hot_fraction: float = 0.10  # of account commands, and of each side of a transfer
    overdraft_fraction: float = 0.02  # of withdrawals: rejected by the domain, as in real life
    invalid: float = 0.0  # malformed or schema-violating commands: rejected and dead-lettered

    @classmethod
    def parse(cls, spec: str) -> Mix:
        """`open=1,deposit=5,withdraw=3,transfer=1,invalid=0.1`; a kind not named weighs 0."""
        names = {"open": "open_account"} | {f.name: f.name for f in fields(cls)}
        weights: dict[str, float] = dict.fromkeys(MIX_KINDS, 0.0)
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, raw = part.partition("=")
            name = names.get(key.strip())
            if not sep or name is None:
                raise ValueError(f"expected kind=weight with kind in {sorted(names)}, got {part!r}")
            try:
                value = float(raw)
            except ValueError as e:
                raise ValueError(f"{key}: {raw!r} is not a number") from e
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}: the weight must be a number >= 0, got {raw!r}")
            weights[name] = value
        if not any(weights[kind] for kind in MIX_KINDS):
            raise ValueError("one of open, deposit, withdraw, transfer, invalid must be > 0")
        return cls(**weights)


MIX_KINDS = ("open_account", "deposit", "withdraw", "transfer", "invalid")


@dataclass(frozen=True, slots=True)
class Cmd:
    """One command ready to publish."""

    command_id: str
    type: str
    aggregate_type: str
    aggregate_id: str
    body: bytes
    # The account whose read-model version the reply's version is, when there is one.
    account_id: str | None

    @property
    def routing_key(self) -> str:
        return f"{self.aggregate_type}.{self.type}"


def command(
    command_type: str, aggregate_type: str, aggregate_id: str, payload: dict[str, object]
) -> Cmd:
    command_id = str(uuid.uuid4())
    body = json.dumps(
        {
            "command_id": command_id,
            "type": command_type,
            "aggregate_id": aggregate_id,
            "expected_version": None,
            "payload": payload,
            "metadata": {
                "correlation_id": command_id,
                "causation_id": None,
                "issued_at": datetime.now(UTC).isoformat(),
                "user": "bench",
            },
        },
        separators=(",", ":"),
    ).encode()
    account = aggregate_id if aggregate_type == ACCOUNT else None
    return Cmd(command_id, command_type, aggregate_type, aggregate_id, body, account)


class Workload:
    """Draws commands from the mix; accounts opened by accepted commands join the pool."""

    def __init__(self, seed: int, hot_accounts: int, mix: Mix | None = None) -> None:
        self._rng = random.Random(seed)
        self._mix = mix or Mix()
        self._hot_count = hot_accounts
        self.accounts: list[str] = []
        self.hot: list[str] = []
        # "invalid" last: with its weight 0, a seed draws the same commands as before it existed.
        self._kinds = ("open", "deposit", "withdraw", "transfer", "invalid")
        self._weights = (
            self._mix.open_account,
            self._mix.deposit,
            self._mix.withdraw,
            self._mix.transfer,
            self._mix.invalid,
        )

    def openings(self, count: int) -> list[Cmd]:
        """Commands opening `count` accounts (the first `hot_accounts` become the hot ones)."""
        return [self._open(SETUP_DEPOSIT) for _ in range(count)]

    def opened(self, cmd: Cmd) -> None:
        """Record an accepted OpenAccount so later commands can target it."""
        if cmd.type != "OpenAccount":
            return
        if len(self.hot) < self._hot_count:
            self.hot.append(cmd.aggregate_id)
        else:
            self.accounts.append(cmd.aggregate_id)

    def next(self) -> Cmd:
        kind = self._rng.choices(self._kinds, self._weights)[0]
        if kind == "invalid":
            return self._invalid()
        # A transfer needs two accounts to choose from (else the loop below would never end).
        if kind == "open" or not self.accounts or (kind == "transfer" and len(self.accounts) < 2):
            return self._open(OPEN_DEPOSIT)
        if kind == "transfer":
            source = self._pick()
            target = self._pick()
            while target == source:
                target = self._rng.choice(self.accounts)
            return command(
                "RequestTransfer",
                TRANSFER,
                str(uuid.uuid4()),
                {
                    "from_account_id": source,
                    "to_account_id": target,
                    "amount": self._rng.randint(1, 1_000),
                },
            )
        account = self._pick()
        if kind == "deposit":
            return command(
                "DepositMoney", ACCOUNT, account, {"amount": self._rng.randint(1, 1_000)}
            )
        amount = (
            OVERDRAFT
            if self._rng.random() < self._mix.overdraft_fraction
            else self._rng.randint(1, 1_000)
        )
        return command("WithdrawMoney", ACCOUNT, account, {"amount": amount})

    def _pick(self) -> str:
        if self.hot and self._rng.random() < self._mix.hot_fraction:
            return self._rng.choice(self.hot)
        return self._rng.choice(self.accounts)

    def _open(self, deposit: int) -> Cmd:
        owner = f"owner-{self._rng.randrange(10_000)}"
        return command(
            "OpenAccount",
            ACCOUNT,
            str(uuid.uuid4()),
            {"owner_id": owner, "currency": CURRENCY, "initial_deposit": deposit},
        )

    def _invalid(self) -> Cmd:
        """A command the service can never process: malformed, of no known type, or bad data."""
        account = self._rng.choice(self.accounts) if self.accounts else str(uuid.uuid4())
        match self._rng.randrange(3):
            case 0:
                return command("DepositMoney", ACCOUNT, account, {"amount": -5})
            case 1:
                return command("Teleport", ACCOUNT, account, {"to": "the moon"})
            case _:
                cmd = command("DepositMoney", ACCOUNT, account, {})
                return Cmd(cmd.command_id, cmd.type, ACCOUNT, account, b"{not json", None)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile (0 < q <= 100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "count": len(seconds),
        "p50": ms(percentile(seconds, 50)),
        "p95": ms(percentile(seconds, 95)),
        "p99": ms(percentile(seconds, 99)),
        "max": ms(max(seconds) if seconds else None),
    }
