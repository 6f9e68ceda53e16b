"""In-memory fake of :class:`~infra.clickhouse.store.ClickHouseStore` for unit tests.

It keeps inserted rows per table and answers the id lookup
(:meth:`MemoryStore.existing_ids`); it runs no SQL. Failures are injected:
``down`` makes every call raise; ``fail_inserts`` makes the next inserts raise,
after storing their rows when ``land_before_failing`` (an insert that raised
may still have landed).
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.clickhouse.store import ClickHouseError, Row


class MemoryStore:
    backend = "memory"

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, object]]] = {}
        self.down = False
        self.fail_inserts = 0
        self.land_before_failing = False
        self.inserts: list[tuple[str, int]] = []  # (table, rows) of every insert that landed
        self.queries: list[str] = []
        self.lookups: list[tuple[str, list[str]]] = []  # (table, ids) of every id lookup
        self.calls = 0  # every call, failed ones included

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ClickHouseError("memory store: down")

    async def execute(self, sql: str) -> None:
        self._check()

    async def query(self, sql: str) -> list[Row]:
        self._check()
        self.queries.append(sql)
        raise ClickHouseError(f"memory store runs no SQL: {sql[:200]}")

    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        self._check()
        if self.fail_inserts > 0:
            self.fail_inserts -= 1
            if self.land_before_failing:
                self._store(table, columns, rows)
            raise ClickHouseError("memory store: insert failed")
        self._store(table, columns, rows)

    def _store(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        self.tables.setdefault(table, []).extend(
            dict(zip(columns, row, strict=True)) for row in rows)
        self.inserts.append((table, len(rows)))

    async def existing_ids(self, table: str, column: str, ids: Sequence[str]) -> set[str]:
        self._check()
        self.lookups.append((table, list(ids)))
        wanted = set(ids)
        return {str(row[column]) for row in self.tables.get(table, []) if row[column] in wanted}

    async def close(self) -> None:
        return None

    def ids(self, table: str, column: str) -> list[object]:
        return [row[column] for row in self.tables.get(table, [])]
