"""Debian's ``clickhouse-server`` (release 18.16) run with config and data under the state dir."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

from infra import InfraError, procs
from infra.clickhouse.store import ClickHouseError, ServerStore
from schemas.config import Settings

PROC_NAME = "clickhouse"
BINARIES = ("/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server")

_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{home}/logs/server.log</log>
        <errorlog>{home}/logs/server.err.log</errorlog>
        <size>50M</size>
        <count>2</count>
    </logger>
    <tcp_port>{port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <max_concurrent_queries>32</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{home}/data/</path>
    <tmp_path>{home}/tmp/</tmp_path>
    <user_files_path>{home}/user_files/</user_files_path>
    <format_schema_path>{home}/format_schemas/</format_schema_path>
    <users_config>{home}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"""

_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"""


def binary() -> str:
    for candidate in (*BINARIES, shutil.which("clickhouse-server")):
        if candidate and Path(candidate).exists():
            return candidate
    raise InfraError("clickhouse-server not found: install Debian's package "
                     "(apt-get install clickhouse-server) or set TOKENWEIR_CLICKHOUSE_URL")


class LocalClickHouseServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = (settings.state_dir / "clickhouse").resolve()
        self.run_dir = settings.run_dir()
        self.url = f"clickhouse://127.0.0.1:{settings.clickhouse_port}"

    def pid(self) -> int | None:
        return procs.running(self.run_dir, PROC_NAME)

    def write_config(self) -> Path:
        for sub in ("logs", "data", "tmp", "user_files", "format_schemas"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        (self.home / "users.xml").write_text(_USERS)
        config = self.home / "config.xml"
        config.write_text(_CONFIG.format(home=self.home, port=self.settings.clickhouse_port))
        return config

    async def start(self, timeout_s: float = 30) -> bool:
        """Start and wait for queries; False if it was already running."""
        if self.pid() is not None:
            await self.wait_ready(timeout_s)
            return False
        config = self.write_config()
        proc = procs.spawn(self.run_dir, PROC_NAME, [binary(), f"--config-file={config}"],
                           log_path=self.home / "logs" / "stdout.log", cwd=self.home)
        try:
            await self.wait_ready(timeout_s, proc)
        except InfraError:
            self.stop()
            raise
        return True

    async def wait_ready(self, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
                         ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc is not None and proc.poll() is not None:
                err = self.home / "logs" / "server.err.log"
                tail = err.read_text(errors="replace")[-2000:] if err.exists() else ""
                raise InfraError(f"clickhouse-server exited with {proc.returncode}:\n{tail}")
            store = ServerStore(self.url)
            try:
                await store.query("SELECT 1")
                return
            except ClickHouseError as exc:
                if time.monotonic() > deadline:
                    raise InfraError(f"clickhouse-server not answering on {self.url}") from exc
            finally:
                await store.close()
            await asyncio.sleep(0.3)

    def stop(self) -> int | None:
        return procs.stop(self.run_dir, PROC_NAME, timeout_s=20)
