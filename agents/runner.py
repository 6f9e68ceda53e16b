"""Runs the named agent in this process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from agents import AgentsError
from schemas.config import Settings

AGENTS = ("passthrough", "admission")


def check(names: list[str]) -> str:
    unknown = sorted(set(names) - set(AGENTS))
    if unknown:
        raise AgentsError(f"unknown agent(s) {unknown}; known: {list(AGENTS)}")
    if len(set(names)) != 1:
        raise AgentsError("passthrough and admission both consume tw.requests: run one")
    return names[0]


async def serve(settings: Settings, name: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if name == "admission":
        from agents.admission import run_admission

        await run_admission(settings, stop)
    else:
        from agents.passthrough import run_passthrough

        await run_passthrough(settings, stop)


def run(settings: Settings, names: list[str], *, loglevel: str = "WARNING") -> None:
    name = check(names)
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(settings, name))
