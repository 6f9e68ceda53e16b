"""Real services for integration tests: a Kafka broker and Debian's ClickHouse server,
started through tokenweir's own infra code on test ports, stopped at the end."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator

import pytest

from infra import procs
from infra.clickhouse.store import ChdbStore, ClickHouseStore, ServerStore
from infra.demo import start_pipeline
from infra.stack import UpReport, down, up
from schemas.config import Settings
from schemas.events import InferenceResult
from schemas.signing import Signer
from streams.client import TokenweirClient
from tests.builders import SECRET, make_request

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
# Several suites may run at once on one machine: each picks its own ports.
PORT_BASE = int(os.environ.get("TOKENWEIR_TEST_PORT_BASE", "19000"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kcat() -> str:
    if KCAT is None:
        pytest.fail("kcat is required by the integration tests (apt-get install kcat)")
    return KCAT


TENANT_KEYS = {tenant: (f"key-{tenant}", SECRET) for tenant in
               ("acme", "globex", "kcat-tenant", "mallory")}
SIGNER = Signer(TENANT_KEYS)

CONTROL_CONFIG = "auth_required = true\n" + "".join(
    f'[keys.{key_id}]\ntenant = "{tenant}"\nsecret = "{secret}"\n'
    f"[tenants.{tenant}]\nlimit_mu_per_min = 100000\nburst_mu = 10000\n"
    for tenant, (key_id, secret) in TENANT_KEYS.items())


def signed_client(settings: Settings) -> TokenweirClient:
    return TokenweirClient(settings.bootstrap, signer=SIGNER)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    state = tmp_path_factory.mktemp("stack")
    (state / "control.toml").write_text(CONTROL_CONFIG)
    return Settings(
        state_dir=state, control_config=state / "control.toml",
        kafka_port=PORT_BASE + 92, kafka_controller_port=PORT_BASE + 93,
        clickhouse_server=True, clickhouse_port=PORT_BASE,
        tenant_partitions=4, shard_partitions=2, reply_partitions=2,
    )


@pytest.fixture(scope="session")
async def stack(settings: Settings) -> AsyncIterator[UpReport]:
    report = await up(settings, print)
    yield report
    down(settings, print)
    assert procs.tracked(settings.run_dir()) == {}


@pytest.fixture(scope="session")
async def pipeline(settings: Settings, stack: UpReport) -> AsyncIterator[list[str]]:
    """The pass-through agent and an echo worker, answering once this fixture returns."""
    names = start_pipeline(settings)
    # The first answer also waits for the agent's and worker's first heartbeats.
    reply = None
    for _ in range(60):
        async with signed_client(settings) as client:
            reply = await client.submit(make_request(prompt="warm up"), timeout_s=120)
        if isinstance(reply, InferenceResult):
            break
        await asyncio.sleep(1)
    assert isinstance(reply, InferenceResult) and reply.status == "ok"
    yield names
    for name in names:
        procs.stop(settings.run_dir(), name)


@pytest.fixture(params=["chdb", "server"])
async def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                settings: Settings, stack: UpReport) -> AsyncIterator[ClickHouseStore]:
    """Each ClickHouse backend in turn: contract tests run once per implementation."""
    backend: ClickHouseStore
    if request.param == "chdb":
        # chDB admits one data directory per process: every test shares this one.
        backend = ChdbStore(tmp_path_factory.getbasetemp() / "chdb")
    else:
        assert settings.clickhouse_server_url is not None
        backend = ServerStore(settings.clickhouse_server_url)
    yield backend
    await backend.close()


async def eventually(check, timeout_s: float = 60.0, interval_s: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(interval_s)
