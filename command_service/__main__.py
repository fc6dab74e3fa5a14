"""`python -m command_service`: run until SIGTERM or SIGINT, then shut down cleanly."""

from __future__ import annotations

import asyncio
import signal

from command_service.bootstrap import start
from command_service.settings import CommandServiceSettings
from cqrs_runtime.logging import configure_logging
from cqrs_runtime.tracing import configure_tracing, shutdown_tracing


async def main() -> None:
    settings = CommandServiceSettings()
    configure_logging(settings.log_level, settings.log_json)
    configure_tracing("command-service", settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = await start(settings)
    await stop.wait()
    await service.stop()
    shutdown_tracing()


def run() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        asyncio.run(main())
    else:
        uvloop.run(main())


if __name__ == "__main__":
    run()
