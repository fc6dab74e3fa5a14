"""py-spy sampling of a running service, and its top frames.

`py-spy record --format raw` writes collapsed stacks (`frame;frame;... count`, root first).
Idle samples are left out by py-spy, so the shares are shares of the process's busy time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.config import REPO_ROOT

_PROJECT_PATH = re.compile(r"/(command_service|query_service|shared|bench)/")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def start(pid: int, seconds: float, output: Path) -> asyncio.subprocess.Process | None:
    """Sample `pid` for `seconds` at 100 Hz without pausing it; None when py-spy is missing."""
    binary = py_spy()
    if binary is None:
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "100",
        "--duration",
        str(max(1, round(seconds))),
        "--nonblocking",
        "--full-filenames",
        "--format",
        "raw",
        "--output",
        str(output),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def _short(frame: str) -> str:
    """`function (path:line)` with the path cut to the package: `function (aiormq/channel.py)`."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", f"{REPO_ROOT}/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        # The services of another checkout (--source): cut the path at the package.
        project = _PROJECT_PATH.search(path)
        if project is not None:
            path = path[project.start() + 1 :]
    return f"{match['function']} ({path})"


def _package(frame: str) -> str:
    match = _FRAME.match(_short(frame))
    if match is None:
        return "?"
    path = match["file"]
    head = path.split("/", 1)[0]
    if head.endswith(".py"):
        return f"stdlib:{head[:-3]}" if "/" not in path else head
    return head


def top_frames(collapsed: Path, limit: int = 15) -> dict[str, Any]:
    """Top frames by self time and by inclusive time, and self time per package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        # py-spy prefixes the thread; frames without a file are not Python code.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]

    project = Counter(
        {
            name: n
            for name, n in inclusive.items()
            if _package(name) in ("command_service", "query_service", "shared")
        }
    )
    return {
        "samples": total,
        "self": share(own) if total else [],
        "inclusive": share(inclusive) if total else [],
        "inclusive_project": share(project) if total else [],
        "self_by_package": share(packages) if total else [],
    }
