"""Versioned DDL under ``migrations/NNNN_name.sql``, applied once each, in order."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from infra import InfraError
from infra.clickhouse.store import ClickHouseStore

MIGRATIONS = Path(__file__).with_name("migrations")
LEDGER = "schema_migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Migration(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int
    name: str
    checksum: str
    statements: tuple[str, ...]


class MigrationReport(BaseModel):
    applied: list[str] = []
    already: list[str] = []


def load(directory: Path = MIGRATIONS) -> list[Migration]:
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise InfraError(f"migration file {path.name}: expected NNNN_name.sql")
        text = path.read_text()
        found.append(Migration(
            version=int(match[1]), name=match[2],
            checksum=hashlib.sha256(text.encode()).hexdigest(),
            statements=tuple(split_statements(text)),
        ))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise InfraError(f"duplicate migration versions in {directory}")
    return found


def split_statements(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def migrate(store: ClickHouseStore, database: str,
                  migrations: list[Migration] | None = None) -> MigrationReport:
    await store.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
    await store.execute(
        f"CREATE TABLE IF NOT EXISTS {database}.{LEDGER} (version UInt32, name String, "
        "checksum String, applied_at DateTime) ENGINE = MergeTree() ORDER BY version")
    rows = await store.query(f"SELECT version, checksum FROM {database}.{LEDGER}")
    done = {int(v): c for v, c in rows}
    report = MigrationReport()
    for m in migrations if migrations is not None else load():
        label = f"{m.version:04d}_{m.name}"
        if m.version in done:
            if done[m.version] != m.checksum:
                raise InfraError(f"migration {label} was edited after it was applied; "
                                 "add a new migration instead")
            report.already.append(label)
            continue
        for statement in m.statements:
            await store.execute(statement.replace("{db}", database))
        await store.insert(f"{database}.{LEDGER}", ["version", "name", "checksum", "applied_at"],
                           [(m.version, m.name, m.checksum, datetime.now(UTC))])
        report.applied.append(label)
    return report
