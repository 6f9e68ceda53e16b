"""The one seam to ClickHouse: embedded chDB or a server over the native protocol.

Both backends run the same SQL. Calls are async; each backend runs its
blocking client on one dedicated thread (neither client is thread-safe).
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from infra import InfraError

Row = tuple[Any, ...]

# The driver logs every failed connect with a traceback; we raise ClickHouseError instead.
logging.getLogger("clickhouse_driver.connection").setLevel(logging.CRITICAL)
T = TypeVar("T")


class ClickHouseError(InfraError):
    """A statement failed on ClickHouse (either backend)."""


class ClickHouseStore(Protocol):
    backend: str

    async def execute(self, sql: str) -> None: ...

    async def query(self, sql: str) -> list[Row]: ...

    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None: ...

    async def existing_ids(self, table: str, column: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` the String column ``column`` of ``table`` already holds."""
        ...

    async def close(self) -> None: ...


class _OneThread:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _datetime(value: datetime | float | int) -> datetime:
    """DateTime columns take naive UTC datetimes; epoch seconds are converted."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None)


def _whole_seconds(value: Any) -> Any:
    """A DateTime column's value as the driver takes it: fractional epoch seconds are
    truncated (as ClickHouse's cast from Float64 does), datetimes made naive UTC."""
    if isinstance(value, float):
        return int(value)
    return _datetime(value) if isinstance(value, datetime) else value


# chDB allows one session per process; every store on a path shares it.
_CHDB_SESSIONS: dict[Path, Any] = {}


class ChdbStore:
    backend = "chdb"

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self._thread = _OneThread("chdb")
        self._scratch: str | None = None  # the Arrow file inserts and id lookups go through

    def _session(self) -> Any:
        session = _CHDB_SESSIONS.get(self.path)
        if session is None:
            from chdb import session as chdb_session

            self.path.mkdir(parents=True, exist_ok=True)
            session = _CHDB_SESSIONS[self.path] = chdb_session.Session(str(self.path))
        return session

    def _run(self, sql: str, fmt: str = "JSONCompact") -> Any:
        try:
            return self._session().query(sql, fmt)
        except Exception as exc:  # chDB raises plain RuntimeError for SQL errors
            raise ClickHouseError(f"chDB: {exc}") from exc

    async def execute(self, sql: str) -> None:
        await self._thread.call(lambda: self._run(sql, "TabSeparated"))

    async def query(self, sql: str) -> list[Row]:
        result = await self._thread.call(lambda: self._run(sql))
        raw = result.bytes()
        if not raw:
            return []
        doc = json.loads(raw)
        converters = [_converter(col["type"]) for col in doc["meta"]]
        return [tuple(c(v) for c, v in zip(converters, row, strict=True)) for row in doc["data"]]

    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        if not rows:
            return
        await self._thread.call(lambda: self._insert_columns(table, columns, rows))

    def _insert_columns(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        # Columnar through Arrow: no text to write or parse, and building the arrays is
        # C code (several times cheaper than serialising the rows to JSON). The table
        # goes to ClickHouse as an Arrow IPC file (tmpfs when there is one) rather
        # than through chDB's Python() table function: reading a Python object needs
        # the GIL throughout the query, which stalls, and is stalled by, the event
        # loop (measured: 33-66 ms alone, 67-111 ms beside a busy loop), while
        # reading a file runs free of it.
        import pyarrow as pa

        try:
            path = self._write_scratch(pa, _arrow_rows(pa, columns, rows))
        except (pa.ArrowException, ValueError, TypeError, OverflowError, OSError) as exc:
            raise ClickHouseError(f"chDB insert into {table}: {exc}") from exc
        names = ", ".join(f"`{c}`" for c in columns)
        # optimize_on_insert=0: a ReplacingMergeTree would otherwise deduplicate each
        # inserted block by its key before writing it, which doubled the insert's time
        # (50k usage rows: ~110 ms -> ~50 ms). Nothing depends on it: the sink never
        # inserts a repeated id, exact reads use FINAL, and background merges replace
        # whatever a redelivery slipped past (as they do on the server, whose 18.16
        # has no such setting).
        self._run(f"INSERT INTO {table} ({names}) SELECT {names} "
                  f"FROM file('{path}', 'ArrowStream') SETTINGS optimize_on_insert = 0",
                  "TabSeparated")

    async def existing_ids(self, table: str, column: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        return await self._thread.call(lambda: self._existing_ids(table, column, ids))

    def _existing_ids(self, table: str, column: str, ids: Sequence[str]) -> set[str]:
        # The ids travel as an Arrow file too: a 20k-id SQL literal cost ~50 ms to parse.
        import pyarrow as pa

        try:
            path = self._write_scratch(pa, pa.table({"id": pa.array(ids, type=pa.string())}))
        except (pa.ArrowException, TypeError, OSError) as exc:
            raise ClickHouseError(f"chDB id lookup in {table}: {exc}") from exc
        result = self._run(f"SELECT {column} FROM {table} WHERE {column} IN "
                           f"(SELECT id FROM file('{path}', 'ArrowStream'))", "TabSeparated")
        return set(result.bytes().decode().split("\n")) - {""}

    def _write_scratch(self, pa: Any, arrow: Any) -> str:
        """Write ``arrow`` as an Arrow IPC stream to this store's scratch file; its path.

        One file per store, rewritten by each insert or lookup (they run one at a
        time on the store's thread); mkstemp names hold no quote.
        """
        if self._scratch is None:
            shm = Path("/dev/shm")
            fd, self._scratch = tempfile.mkstemp(
                prefix="tokenweir-chdb-", suffix=".arrow",
                dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
            os.close(fd)
        with pa.OSFile(self._scratch, "wb") as sink, pa.ipc.new_stream(sink, arrow.schema) as w:
            w.write_table(arrow)
        return self._scratch

    async def close(self) -> None:
        await self._thread.call(self._remove_scratch)
        self._thread.shutdown()

    def _remove_scratch(self) -> None:
        if self._scratch is not None:
            Path(self._scratch).unlink(missing_ok=True)
            self._scratch = None


# Arrow types of plain Python values (bool before int: it is one).
_ARROW_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "bool_"), (int, "int64"), (float, "float64"), (str, "string"))


def _arrow_rows(pa: Any, columns: Sequence[str], rows: Sequence[Row]) -> Any:
    """An Arrow table of ``rows``.

    Fast path: when the first row holds only plain values, its types type every
    column and Arrow converts the row tuples in one pass (a struct array), with
    no transposition in Python and no type inference: ~0.5 µs a row of 15
    columns against ~2.3 µs for transposing and inferring column by column. A
    value that does not fit its column's type (an int where the first row had a
    float is fine; a str is not) falls back to per-column inference.
    """
    types = []
    for value in rows[0]:
        kind = next((name for t, name in _ARROW_TYPES if type(value) is t), None)
        if kind is None:  # datetimes, None, …: the per-column path
            break
        types.append(getattr(pa, kind)())
    if len(types) == len(columns):
        try:
            typed = pa.array(rows, type=pa.struct(list(zip(columns, types, strict=True))))
            return pa.Table.from_struct_array(typed)
        except (pa.ArrowException, TypeError, OverflowError):
            pass
    arrays = [_arrow_column(pa, col) for col in zip(*rows, strict=True)]
    return pa.Table.from_arrays(arrays, names=list(columns))


def _arrow_column(pa: Any, column: Sequence[Any]) -> Any:
    """An Arrow array of ``column``; datetimes (naive ones are UTC) as epoch seconds."""
    try:
        array = pa.array(column)
    except (pa.ArrowException, TypeError):  # datetimes mixed with epoch numbers
        array = None
    if array is None or pa.types.is_timestamp(array.type):
        # Converted here, not by Arrow, so that no time zone setting can shift them.
        array = pa.array([calendar.timegm(_datetime(v).timetuple())
                          if isinstance(v, datetime) else v for v in column])
    return array


def _converter(ch_type: str) -> Callable[[Any], Any]:
    base = ch_type.removeprefix("Nullable(").rstrip(")")
    if base.startswith(("UInt", "Int")):
        return lambda v: None if v is None else int(v)
    if base.startswith("Float"):
        return lambda v: None if v is None else float(v)
    if base.startswith("DateTime"):
        return lambda v: None if v is None else datetime.strptime(v[:19], "%Y-%m-%d %H:%M:%S")
    return lambda v: v


class ServerStore:
    """A ClickHouse server over clickhouse-driver's native protocol."""

    backend = "server"

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("clickhouse", "tcp"):
            raise InfraError(f"ClickHouse URL {url!r}: expected clickhouse://host:port")
        self.url = url
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 9000
        self._user = parsed.username or "default"
        self._password = parsed.password or ""
        self._thread = _OneThread("clickhouse")
        self._client: Any = None
        self._timed: dict[str, frozenset[str]] = {}  # table -> its DateTime columns

    def _connected(self) -> Any:
        if self._client is None:
            from clickhouse_driver import Client

            self._client = Client(host=self._host, port=self._port, user=self._user,
                                  password=self._password, connect_timeout=5,
                                  send_receive_timeout=60, settings={"use_numpy": False})
        return self._client

    def _run(self, sql: str, params: Any = None, *, columnar: bool = False,
             external_tables: list[dict[str, Any]] | None = None) -> Any:
        from clickhouse_driver import errors as ch_errors

        try:
            return self._connected().execute(sql, params, columnar=columnar,
                                             external_tables=external_tables)
        except (ch_errors.Error, OSError, EOFError) as exc:
            if self._client is not None:
                self._client.disconnect()
            raise ClickHouseError(f"ClickHouse {self._host}:{self._port}: {exc}") from exc

    async def execute(self, sql: str) -> None:
        await self._thread.call(lambda: self._run(sql))

    async def query(self, sql: str) -> list[Row]:
        rows = await self._thread.call(lambda: self._run(sql))
        return [tuple(r) for r in rows]

    async def insert(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        if not rows:
            return
        await self._thread.call(lambda: self._insert_columns(table, columns, rows))

    def _insert_columns(self, table: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
        # Columnar: the driver skips its per-row checks and transposition (several
        # times faster). DateTime columns are converted here: the driver takes only
        # datetimes and whole epoch seconds, where ClickHouse's own cast (chDB's path)
        # also takes fractional seconds and truncates them.
        timed = self._datetime_columns(table)
        data = [[_whole_seconds(v) for v in col] if name in timed else list(col)
                for name, col in zip(columns, zip(*rows, strict=True), strict=True)]
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
        try:
            self._run(sql, data, columnar=True)
        except ClickHouseError:
            self._timed.pop(table, None)  # in case the table changed: described anew
            raise

    def _datetime_columns(self, table: str) -> frozenset[str]:
        """Names of ``table``'s DateTime columns (asked once per table)."""
        names = self._timed.get(table)
        if names is None:
            described = self._run(f"DESCRIBE TABLE {table}")
            bases = {name: ch_type.removeprefix("Nullable(") for name, ch_type, *_ in described}
            names = self._timed[table] = frozenset(
                name for name, base in bases.items()
                if base.startswith("DateTime") and not base.startswith("DateTime64"))
        return names

    async def existing_ids(self, table: str, column: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        # The ids go as an external table of the query (native protocol), not as a
        # literal: no query-size limit and nothing to parse.
        external = [{"name": "tw_ids", "structure": [("id", "String")],
                     "data": [{"id": i} for i in ids]}]
        sql = f"SELECT {column} FROM {table} WHERE {column} IN (SELECT id FROM tw_ids)"
        rows = await self._thread.call(lambda: self._run(sql, external_tables=external))
        return {r[0] for r in rows}

    async def close(self) -> None:
        await self._thread.call(lambda: self._client and self._client.disconnect())
        self._thread.shutdown()


def open_store(url: str | None, chdb_path: Path) -> ClickHouseStore:
    """The server when a URL is configured, otherwise embedded chDB at ``chdb_path``."""
    if url:
        return ServerStore(url)
    return ChdbStore(chdb_path)
