"""Runs a Faust worker process hosting the named agents."""

from __future__ import annotations

import asyncio
import logging

import faust
import uvloop

from agents import AgentsError
from schemas.config import Settings
from streams.app import create_app

AGENTS = ("passthrough", "admission")


def build(settings: Settings, names: list[str]) -> faust.App:
    unknown = sorted(set(names) - set(AGENTS))
    if unknown:
        raise AgentsError(f"unknown agent(s) {unknown}; known: {list(AGENTS)}")
    if {"passthrough", "admission"} <= set(names):
        raise AgentsError("passthrough and admission both consume tw.requests: run one")
    app = create_app(settings)
    if "passthrough" in names:
        from agents import passthrough

        passthrough.register(app, settings)
    if "admission" in names:
        from agents import admission

        admission.register(app, settings)
    return app


def run(settings: Settings, names: list[str], *, loglevel: str = "WARNING") -> None:
    app = build(settings, names)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    logging.getLogger("faust").setLevel(loglevel)
    worker = faust.Worker(app, loop=loop, loglevel=loglevel, quiet=True)
    # No terminal spinner: to spin on every log message, Faust sets the root logger to
    # DEBUG, and every aiokafka debug call then builds a record that no handler wants
    # (~8 % of the admission agent's time at 1,000 requests/s).
    worker.spinner = None
    worker.execute_from_commandline()
