"""Blue-green rebuild of read models from a replay of the event store, without stopping queries.

For each read model, generation `target = current + 1` is claimed in the `read_models`
collection. From then on the live projector writes every event into the target as well, skipping
(never parking) what the target cannot take yet and recording the highest skipped position. The
rebuild meanwhile asks the command service for replays, round after round: round 1 covers
positions (0, b1], round k covers (b(k-1), bk], each bk being the newest position when that
replay started. A model is switched after a round k when

1. no live event above bk was skipped for its target, and
2. a final check finds every aggregate at least as far in the target as in the current
   generation (the current one is read first, then the target).

Why the target then equals the current generation and stays equal:

- every write into any generation is guarded by the aggregate's version, so a generation always
  holds, per aggregate, a prefix of its history in order;
- after round k every aggregate has in the target all its events up to bk: by induction, round
  k delivers the events in (b(k-1), bk] in order to a target already holding those up to
  b(k-1);
- an event the projector routed with pointers read before the claim was published before the
  claim, so its position is at most b1 and a replay brings it;
- once the check passed for an aggregate, its next live event has version current + 1, at most
  target + 1, so the target takes it (or already has it): no later skip, no later difference;
- the switch is one conditional update of `current`; the projector and the API read the
  pointers fresh for every event and query, so nothing keeps writing or reading the old
  generation, which is dropped after a grace period.

A replay the command service restarts (its replica died) begins again with `ReplayStarted`;
applying events twice changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from query_service.projections.store import TRANSIENT_ERRORS
from query_service.service_layer.catalog import (
    ModelState,
    ReadModelCatalog,
    RebuildConflictError,
    drop_generations,
    ensure_indexes,
)
from shared.messages import EventEnvelope, ReplayProgress

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

# A rebuild whose heartbeat is older than this is taken to be dead and may be taken over.
STALE_AFTER_SECONDS = 30.0
VERIFY_BATCH = 500


@dataclass(frozen=True)
class ReplayStarted:
    progress: ReplayProgress


@dataclass(frozen=True)
class ReplayEvents:
    events: list[EventEnvelope]


@dataclass(frozen=True)
class ReplayFinished:
    progress: ReplayProgress


ReplayItem = ReplayStarted | ReplayEvents | ReplayFinished


class ReplaySource(Protocol):
    """Streams stored events after a position, in position order, framed by start and finish."""

    def replay(
        self, *, after_position: int, aggregate_types: Sequence[str]
    ) -> AsyncIterator[ReplayItem]: ...


class RebuildError(Exception):
    """The rebuild could not finish; the current generation is untouched."""


@dataclass
class RebuildProgress:
    """Where a rebuild is; what the CLI prints, the log says and `/admin/read-models` shows."""

    rebuild_id: str
    read_models: list[str]
    state: str = "starting"
    round: int = 0
    after_position: int = 0
    up_to_position: int | None = None
    done: int = 0
    total: int | None = None
    events: int = 0  # over all rounds
    rate: float = 0.0  # events per second in this round
    eta_seconds: float | None = None
    elapsed_seconds: float = 0.0
    replay_seconds: float = 0.0  # spent in finished rounds, from ReplayStarted to ReplayFinished
    switched: list[str] = field(default_factory=list)
    error: str | None = None

    def as_fields(self) -> dict[str, object]:
        return {
            "state": self.state,
            "round": self.round,
            "after_position": self.after_position,
            "up_to_position": self.up_to_position,
            "done": self.done,
            "total": self.total,
            "events": self.events,
            "rate": round(self.rate, 1),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "elapsed_seconds": round(self.elapsed_seconds, 1),
            "events_per_second": round(self.events_per_second, 1),
            "read_models": self.read_models,
        }

    @property
    def events_per_second(self) -> float:
        """Over every finished round: the rebuild's throughput."""
        return self.events / self.replay_seconds if self.replay_seconds > 0 else 0.0

    def describe(self) -> str:
        models = ",".join(self.read_models)
        if self.state == "replaying" and self.total is not None:
            share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
            eta = "" if self.eta_seconds is None else f", ETA {self.eta_seconds:.0f}s"
            return (
                f"{models}: round {self.round}, {self.done}/{self.total} events{share}, "
                f"{self.rate:.0f} events/s{eta}"
            )
        if self.state == "done":
            return (
                f"{models}: switched ({', '.join(self.switched)}) after {self.round} round(s), "
                f"{self.events} events replayed at {self.events_per_second:.0f} events/s, "
                f"{self.elapsed_seconds:.1f}s in all"
            )
        return f"{models}: {self.state}, round {self.round}"


ProgressCallback = Callable[[RebuildProgress], None]


@dataclass(frozen=True)
class RebuildPolicy:
    """How a rebuild proceeds (the replay source decides the batch size)."""

    max_rounds: int = 20
    # Replayed events gathered before they are written: the more of an aggregate's events one
    # write holds (each document's events fold into one), the fewer writes (memory: about
    # 1 KiB each).
    write_events: int = 5_000
    retire_seconds: float = 10.0
    progress_seconds: float = 1.0
    stale_after_seconds: float = STALE_AFTER_SECONDS


class Rebuild:
    """One rebuild of some read models; `run` claims, replays, verifies, switches and retires."""

    def __init__(
        self,
        catalog: ReadModelCatalog,
        source: ReplaySource,
        read_models: Sequence[str],
        *,
        policy: RebuildPolicy | None = None,
        owner: str = "",
        on_progress: ProgressCallback | None = None,
        rebuild_id: str | None = None,
    ) -> None:
        unknown = [name for name in read_models if name not in catalog.models]
        if unknown or not read_models:
            raise ValueError(
                f"unknown read models {unknown}; known: {sorted(catalog.models)}"
                if unknown
                else "no read model to rebuild"
            )
        self._catalog = catalog
        self._source = source
        self._policy = policy or RebuildPolicy()
        self._owner = owner
        self._on_progress = on_progress
        self.rebuild_id = rebuild_id or str(uuid.uuid4())
        self.progress = RebuildProgress(self.rebuild_id, list(dict.fromkeys(read_models)))
        self._lost: RebuildConflictError | None = None
        self._claimed: dict[str, ModelState] = {}
        self._pending: dict[str, ModelState] = {}
        self._started = time.monotonic()
        self._round_started = self._started

    async def claim(self) -> None:
        """Reserve the target generations (or raise `RebuildConflictError`); idempotent."""
        if self._claimed:
            return
        registry = self._catalog.registry
        try:
            for name in self.progress.read_models:
                self._claimed[name] = await registry.claim(
                    name,
                    rebuild_id=self.rebuild_id,
                    owner=self._owner,
                    stale_after=self._policy.stale_after_seconds,
                )
        except RebuildConflictError:
            await self._abandon("another rebuild holds one of the read models")
            raise
        self._pending = dict(self._claimed)

    async def run(self) -> RebuildProgress:
        """Claim (unless done already), replay round after round, switch, retire; or abandon."""
        await self.claim()
        main = asyncio.current_task()
        assert main is not None
        heartbeat = asyncio.create_task(self._heartbeat(main), name="rebuild-heartbeat")
        try:
            await self._prepare()
            await self._rounds()
        except BaseException as e:
            error = self._lost or e
            self.progress.error = repr(error)
            self._set_state("failed")
            log.error("rebuild_failed", rebuild_id=self.rebuild_id, error=repr(error))
            with contextlib.suppress(Exception):
                await asyncio.shield(self._abandon(repr(error)))
            if self._lost is not None:
                raise self._lost from e
            raise
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        # Every read model is switched; what is left is dropping the replaced generations once
        # no query can still be reading them. If this process stops first, the next rebuild
        # of the model drops them.
        self._set_state("retiring")
        await self._save_progress(self.progress.switched)
        await asyncio.sleep(self._policy.retire_seconds)
        await self._retire()
        self._set_state("done")
        await self._save_progress(self.progress.switched)
        log.info("rebuild_done", rebuild_id=self.rebuild_id, **self.progress.as_fields())
        return self.progress

    async def _prepare(self) -> None:
        database = self._catalog.database
        for name, state in self._claimed.items():
            assert state.target is not None
            model = self._catalog.models[name]
            # Leftovers of an abandoned attempt; the live projector may already write the
            # target again, which is harmless: every write is version-guarded. Its secondary
            # indexes are built just before the switch: maintaining them during the replay
            # would cost more than building them once.
            await drop_generations(database, model, keep={state.current})
            log.info(
                "rebuild_started",
                rebuild_id=self.rebuild_id,
                read_model=name,
                current=state.current,
                target=state.target,
            )

    async def _rounds(self) -> None:
        after = 0
        for round_number in range(1, self._policy.max_rounds + 1):
            up_to = await self._round(round_number, after)
            for name in list(self._pending):
                await self._try_switch(name, up_to)
            if not self._pending:
                return
            after = up_to
        raise RebuildError(
            f"{sorted(self._pending)} did not catch up with the live stream in "
            f"{self._policy.max_rounds} rounds"
        )

    async def _round(self, round_number: int, after: int) -> int:
        progress = self.progress
        progress.round = round_number
        progress.after_position = after
        progress.up_to_position = None
        progress.done, progress.total = 0, None
        self._set_state("waiting_for_replay")
        projections = [
            self._catalog.projection(name, state.target)
            for name, state in self._pending.items()
            if state.target is not None
        ]
        types = sorted(
            {t for name in self._pending for t in self._catalog.models[name].aggregate_types}
        )
        last_report = time.monotonic()
        gathered: list[EventEnvelope] = []

        async def write() -> None:
            if not gathered:
                return
            # Read models are independent: write them side by side, and let every write
            # finish before a failure of one stops the rebuild.
            outcomes = await asyncio.gather(
                *(projection.apply_batch(gathered) for projection in projections),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            progress.done += len(gathered)
            progress.events += len(gathered)
            gathered.clear()

        stream = self._source.replay(after_position=after, aggregate_types=types)
        try:
            async for item in stream:
                match item:
                    case ReplayStarted(progress=started):
                        await write()  # a stream started over: what came is still right
                        # Also when a replica died and another starts the stream over.
                        progress.total = started.total
                        progress.up_to_position = started.up_to_position
                        progress.done = 0
                        self._round_started = time.monotonic()
                        self._set_state("replaying")
                        log.info(
                            "replay_started",
                            rebuild_id=self.rebuild_id,
                            round=round_number,
                            total=started.total,
                            after_position=started.after_position,
                            up_to_position=started.up_to_position,
                        )
                    case ReplayEvents(events=events):
                        gathered.extend(events)
                        if len(gathered) < self._policy.write_events:
                            continue
                        await write()
                        now = time.monotonic()
                        if now - last_report >= self._policy.progress_seconds:
                            last_report = now
                            self._report()
                    case ReplayFinished(progress=finished):
                        await write()
                        progress.up_to_position = finished.up_to_position
                        progress.replay_seconds += time.monotonic() - self._round_started
                        self._report()
                        log.info(
                            "replay_finished",
                            rebuild_id=self.rebuild_id,
                            round=round_number,
                            events=progress.done,
                            seconds=round(time.monotonic() - self._round_started, 2),
                        )
                        return finished.up_to_position
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        raise RebuildError("the replay ended without ReplayFinished")

    async def _try_switch(self, name: str, up_to: int) -> None:
        state = self._pending[name]
        assert state.target is not None
        registry = self._catalog.registry
        skipped = await registry.skipped_max_position(name, self.rebuild_id)
        if skipped > up_to:
            log.info(
                "rebuild_needs_another_round",
                read_model=name,
                skipped_max_position=skipped,
                up_to_position=up_to,
            )
            return
        self._set_state("verifying")
        behind = await self.behind(name, state)
        if behind:
            log.info("rebuild_target_behind", read_model=name, aggregates_behind=behind)
            return
        await ensure_indexes(self._catalog.database, self._catalog.models[name], state.target)
        await registry.switch(name, self.rebuild_id, current=state.current, target=state.target)
        del self._pending[name]
        self.progress.switched.append(name)
        log.info(
            "read_model_switched",
            rebuild_id=self.rebuild_id,
            read_model=name,
            generation=state.target,
            previous=state.current,
        )

    async def behind(self, name: str, state: ModelState) -> int:
        """How many aggregates the target has not reached as far as the current generation.

        Reads each batch from the current generation before the target, so an event written
        to both in between can only make the target look further ahead, never behind.
        """
        assert state.target is not None
        model = self._catalog.models[name]
        live = self._catalog.collections(name, state.current)[model.version_collection]
        rebuilt = self._catalog.collections(name, state.target)[model.version_collection]
        behind = 0
        last_id: object = None
        while True:
            query = {} if last_id is None else {"_id": {"$gt": last_id}}
            documents = await live.find(query).sort("_id", 1).limit(VERIFY_BATCH).to_list()
            if not documents:
                return behind
            ids = [document["_id"] for document in documents]
            theirs = {
                document["_id"]: model.versions(document)
                async for document in rebuilt.find({"_id": {"$in": ids}})
            }
            for document in documents:
                have = theirs.get(document["_id"], {})
                behind += sum(
                    1
                    for aggregate, version in model.versions(document).items()
                    if have.get(aggregate, 0) < version
                )
            last_id = ids[-1]

    async def _retire(self) -> None:
        registry = self._catalog.registry
        for name in self.progress.switched:
            state = await registry.state(name)
            keep = {state.current} | ({state.target} if state.target is not None else set())
            dropped = await drop_generations(
                self._catalog.database, self._catalog.models[name], keep
            )
            await registry.retired(name, self.rebuild_id)
            log.info("read_model_generation_retired", read_model=name, dropped=dropped)

    async def _abandon(self, reason: str) -> None:
        registry = self._catalog.registry
        for name in list(self._claimed):
            if name in self.progress.switched:
                continue
            if not await registry.abandon(name, self.rebuild_id, reason):
                continue  # no longer ours
            current = await registry.state(name)
            await drop_generations(
                self._catalog.database, self._catalog.models[name], keep={current.current}
            )

    async def _heartbeat(self, main: asyncio.Task[object]) -> None:
        while True:
            await asyncio.sleep(self._policy.progress_seconds)
            self.progress.elapsed_seconds = time.monotonic() - self._started
            try:
                await self._save_progress(self._pending)
            except RebuildConflictError as e:
                # Taken over after we looked dead: stop at once, touch nothing of theirs.
                self._lost = e
                main.cancel()
                return
            except TRANSIENT_ERRORS as e:
                log.warning("rebuild_heartbeat_failed", error=repr(e))

    async def _save_progress(self, names: Iterable[str]) -> None:
        fields = self.progress.as_fields()
        for name in list(names):
            await self._catalog.registry.save_progress(str(name), self.rebuild_id, fields)

    def _set_state(self, state: str) -> None:
        self.progress.state = state
        self._report(log_it=False)

    def _report(self, *, log_it: bool = True) -> None:
        progress = self.progress
        now = time.monotonic()
        progress.elapsed_seconds = now - self._started
        seconds = now - self._round_started
        progress.rate = progress.done / seconds if seconds > 0 and progress.done else 0.0
        if progress.total is not None and progress.rate > 0:
            progress.eta_seconds = max(progress.total - progress.done, 0) / progress.rate
        else:
            progress.eta_seconds = None
        if log_it:
            log.info("rebuild_progress", rebuild_id=self.rebuild_id, **progress.as_fields())
        if self._on_progress is not None:
            self._on_progress(progress)
