"""Processes under measurement: the services started as `python -m ...`, and the servers.

CPU seconds and memory come from /proc (Linux): utime + stime of every thread of a process, its
resident set now (VmRSS) and at its peak (VmHWM). No sampling thread is needed for the peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import REPO_ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ')' do not.
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process in KiB; empty when it is gone."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(rest.split()[0])
    except OSError:
        return {}
    return found


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (the query service's API processes)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found.extend([child, *descendants(child)])
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        parts = f.readline().split()
    values = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


async def wait_quiet(max_wait: float, *, threshold: float = 0.3) -> dict[str, float]:
    """Wait (at most `max_wait` seconds) until the machine is less than `threshold` busy.

    Other work on the machine (someone's test run) would be measured along; this waits it out
    when it can, and says how busy the machine was when the measurement started regardless.
    """
    started = time.monotonic()
    while True:
        before = machine_cpu()
        await asyncio.sleep(1.0)
        after = machine_cpu()
        busy = (after[0] - before[0]) / max(after[1] - before[1], 1e-9)
        waited = time.monotonic() - started
        if busy < threshold or waited >= max_wait:
            return {"busy_before": round(busy, 2), "waited_s": round(waited, 1)}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


@dataclass(frozen=True)
class ServerGroups:
    """Finds the server processes sharing the machine with the services, by name."""

    mongo_port: int | None

    def pids(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"rabbitmq": [], "postgres": [], "mongo": []}
        mongo_marker = f"--port {self.mongo_port} " if self.mongo_port else None
        for pid in _all_pids():
            comm = _comm(pid)
            if comm == "beam.smp":
                groups["rabbitmq"].append(pid)
            elif comm == "postgres":
                groups["postgres"].append(pid)
            elif (
                mongo_marker
                and "secantusd" in (line := _cmdline(pid) + " ")
                and (mongo_marker in line)
            ):
                groups["mongo"].append(pid)
        return groups


@dataclass
class CpuWindow:
    """CPU seconds per named group of processes between `start` and `stop`.

    Processes are compared pid by pid: one that started inside the window counts from zero, one
    that exited inside it is lost (PostgreSQL backends of a pool live as long as the pool).
    """

    groups: Mapping[str, Iterable[int]]
    before: dict[int, float] = field(default_factory=dict)
    machine_before: tuple[float, float] = (0.0, 0.0)

    def start(self) -> CpuWindow:
        self.before = {
            pid: seconds
            for pids in self.groups.values()
            for pid in pids
            if (seconds := cpu_seconds(pid)) is not None
        }
        self.machine_before = machine_cpu()
        return self

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                now = cpu_seconds(pid)
                if now is not None:
                    total += now - self.before.get(pid, 0.0)
            used[name] = round(total, 3)
        busy, total_seconds = machine_cpu()
        # Whatever else ran on the machine meanwhile: the noise this window suffered.
        used["other"] = round(busy - self.machine_before[0] - sum(used.values()), 3)
        used["machine_busy"] = round(busy - self.machine_before[0], 3)
        used["machine_total"] = round(total_seconds - self.machine_before[1], 3)
        return used


@dataclass
class ServiceProcess:
    """One service replica running as `python -m <service>`, its output in a log file."""

    name: str  # e.g. command_service#2
    service: str
    process: asyncio.subprocess.Process
    log_path: Path
    peak_rss_kib: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def pids(self) -> list[int]:
        """This process and the ones it started: a replica's whole CPU and memory."""
        return [self.pid, *descendants(self.pid)]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self.pids)

    def sample_memory(self) -> dict[str, int]:
        """VmRSS and VmHWM summed over the replica's processes (the peaks are each process's
        own, so their sum is an upper bound of the replica's)."""
        found: dict[str, int] = {}
        for pid in self.pids:
            for key, kib in memory_kib(pid).items():
                found[key] = found.get(key, 0) + kib
        self.peak_rss_kib = max(self.peak_rss_kib, found.get("VmHWM", 0))
        return found

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; records the peak RSS first."""
        if not self.running:
            return self.process.returncode
        self.sample_memory()
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            return await self.process.wait()


async def start_module(
    module: str,
    args: list[str],
    name: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path = REPO_ROOT,
) -> ServiceProcess:
    """Start `python -m <module> <args>` in `cwd`, `env` on top of this environment.

    For the services (`command_service`, `query_service`; `python -m` imports them from `cwd`
    first, so another checkout can be measured) and the benchmark's own workers.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    return ServiceProcess(name, module, process, log_path)
