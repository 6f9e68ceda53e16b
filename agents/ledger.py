"""The admission agent's durable state: tenant states and open reservations.

Held in memory for the partitions this member owns, and written to a compacted
changelog (``tw.ledger``, co-partitioned with ``tw.requests`` and ``tw.usage``):
key ``t/<tenant>`` holds a :class:`TenantState`, key ``r/<request id>`` an open
:class:`Reservation`; a settled reservation is deleted (a tombstone).

A batch's writes go to each partition in this order: reservations opened,
then the touched tenants' states (each carrying the highest request and usage
offsets it applied), then tombstones of the reservations settled. Kafka keeps
a partition's order, so a crash keeps a prefix of it, and the replayed records
complete it:

* a reservation without its tenant's state: the replayed request finds its
  own reservation and charges it again (the state never had it);
* a state without a settled reservation's tombstone: the replayed usage record
  is at or below the state's usage offset, so it is not applied again, and
  its reservation is closed then.

A usage record whose reservation is absent is a redelivery (or for a request
never admitted): counted as a duplicate, charged nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from agents import AgentsError
from agents.limiter import Reservation, TenantState
from streams.sink import BulkEventSink, KeyedRecord

# An open reservation: MU reserved, epoch second charged in, partition, tenant, offset
# of the admitting record. Settling reads the first two (agents.control.Held).
Held = tuple[float, int, int, str, int]

log = logging.getLogger(__name__)

_STATE, _RESERVATION = b"t/", b"r/"


@dataclass(frozen=True)
class LedgerWrites:
    """One batch's ledger records, per partition in write order."""

    sink: BulkEventSink
    topic: str
    records: dict[int, list[KeyedRecord]]

    async def write(self) -> None:
        for partition, records in self.records.items():
            await self.sink.send_many(self.topic, partition, records)


class Ledger:
    def __init__(self, sink: BulkEventSink, topic: str) -> None:
        self._sink = sink
        self.topic = topic
        self._states: dict[str, TenantState] = {}
        self._tenant_partition: dict[str, int] = {}
        # Open reservations as tuples of numbers and strings, which the garbage collector
        # stops tracking, not models: tens of thousands of models made each full
        # collection of the agent's heap take ~100 ms. Settling reads only the first.
        self._open: dict[str, Held] = {}  # id -> MU, second charged, partition, tenant, offset
        # Staged by the current batch, encoded by stage():
        self._opened: list[tuple[int, str, Reservation]] = []
        self._dirty: dict[str, tuple[int, TenantState]] = {}
        self._closed: list[tuple[int, Sequence[str]]] = []

    def state(self, tenant: str) -> TenantState | None:
        dirty = self._dirty.get(tenant)
        return dirty[1] if dirty is not None else self._states.get(tenant)

    def reservation(self, request_id: str) -> Reservation | None:
        held = self._open.get(request_id)
        if held is None:
            return None
        mu, slot, _, tenant, admit_offset = held
        return Reservation(tenant=tenant, mu=mu, slot=slot, admit_offset=admit_offset)

    def held(self, request_ids: Iterable[str]) -> list[Held | None]:
        """Each open reservation as stored (MU and the second it was charged in first),
        None where none is open: all that settling needs (a model per usage record
        would cost more than settling it)."""
        return list(map(self._open.get, request_ids))

    def tenants(self) -> list[str]:
        """Tenants whose state this member holds."""
        return list(self._states.keys() | self._dirty.keys())

    def open(self, partition: int, request_id: str, reservation: Reservation) -> None:
        self._hold(partition, request_id, reservation)
        self._opened.append((partition, request_id, reservation))

    def _hold(self, partition: int, request_id: str, reservation: Reservation) -> None:
        if reservation.settled:
            raise AgentsError(f"reservation {request_id} is settled: the ledger holds open ones")
        self._open[request_id] = (reservation.mu, reservation.slot, partition,
                                  reservation.tenant, reservation.admit_offset)

    def update(self, partition: int, tenant: str, state: TenantState) -> None:
        self._dirty[tenant] = (partition, state)

    def close(self, partition: int, request_ids: Sequence[str]) -> None:
        """Delete settled reservations (their tombstones follow the states, see ``stage``)."""
        pop = self._open.pop
        for request_id in request_ids:
            pop(request_id, None)
        self._closed.append((partition, request_ids))

    def stage(self) -> LedgerWrites | None:
        """The batch's writes, encoded, in the order the module docstring relies on (None:
        nothing to write). The batch's effects count as held from here on; writing them
        may go on in the background (the loop does so before committing the batch)."""
        opened, self._opened = self._opened, []
        dirty, self._dirty = self._dirty, {}
        closed, self._closed = self._closed, []
        writes: dict[int, list[KeyedRecord]] = {}
        for partition, request_id, reservation in opened:
            writes.setdefault(partition, []).append(
                (_RESERVATION + request_id.encode(), reservation.model_dump_json().encode()))
        for tenant, (partition, state) in dirty.items():
            self._states[tenant] = state
            self._tenant_partition[tenant] = partition
            writes.setdefault(partition, []).append(
                (_STATE + tenant.encode(), state.model_dump_json().encode()))
        for partition, request_ids in closed:
            writes.setdefault(partition, []).extend(
                [(_RESERVATION + request_id.encode(), None) for request_id in request_ids])
        return LedgerWrites(self._sink, self.topic, writes) if writes else None

    def restore(self, records: Iterable[tuple[int, bytes | None, bytes | None]]) -> int:
        """Apply changelog records (partition, key, value) in order; returns how many."""
        n = 0
        for partition, key, value in records:
            n += 1
            if key is None:
                continue
            try:
                self._restore_one(partition, key, value)
            except (ValidationError, UnicodeDecodeError, AgentsError) as exc:
                # Written by this code, so never expected; one bad record must not keep
                # a tenant's partition from starting.
                log.error("ledger record %r in partition %d skipped: %s", key[:80],
                          partition, exc)
        return n

    def _restore_one(self, partition: int, key: bytes, value: bytes | None) -> None:
        name = key[2:].decode()
        if key.startswith(_STATE):
            if value is None:
                self._states.pop(name, None)
            else:
                self._states[name] = TenantState.model_validate_json(value)
                self._tenant_partition[name] = partition
        elif key.startswith(_RESERVATION):
            if value is None:
                self._open.pop(name, None)
            else:
                self._hold(partition, name, Reservation.model_validate_json(value))

    def drop(self, partitions: set[int]) -> None:
        """Forget the state of partitions this member no longer owns."""
        for tenant in [t for t, p in self._tenant_partition.items() if p in partitions]:
            del self._tenant_partition[tenant]
            self._states.pop(tenant, None)
        for request_id in [r for r, held in self._open.items() if held[2] in partitions]:
            del self._open[request_id]
