"""The admission agent's ledger: write order, restore and drop (no Kafka)."""

from __future__ import annotations

from agents.ledger import Ledger
from agents.limiter import Reservation, TenantState
from streams.sink import MemoryEventSink

TOPIC = "tw.ledger"


def make_state(**overrides) -> TenantState:
    return TenantState(**{"tokens": 10.0, "updated_at": 1000.0, **overrides})


def make_reservation(**overrides) -> Reservation:
    return Reservation(**{"tenant": "acme", "mu": 1.5, "slot": 1000, "admit_offset": 0,
                          **overrides})


async def seal(ledger: Ledger) -> None:
    writes = ledger.stage()
    if writes is not None:
        await writes.write()


async def test_ledger_seal_writes_reservations_then_states_then_tombstones():
    sink = MemoryEventSink()
    ledger = Ledger(sink, TOPIC)
    ledger.close(2, ["r-old"])
    ledger.update(2, "acme", make_state(pending=1))
    ledger.open(2, "r-new", make_reservation())
    assert ledger.state("acme") == make_state(pending=1)  # staged states are read back
    await seal(ledger)
    assert [(r.key, r.value is None, r.partition) for r in sink.on(TOPIC)] == [
        (b"r/r-new", False, 2), (b"t/acme", False, 2), (b"r/r-old", True, 2)]


async def test_ledger_restore_replays_the_changelog_and_tombstones_delete():
    sink = MemoryEventSink()
    writer = Ledger(sink, TOPIC)
    writer.open(1, "r1", make_reservation())
    writer.open(1, "r2", make_reservation(admit_offset=1))
    writer.update(1, "acme", make_state(pending=2))
    await seal(writer)
    writer.close(1, ["r1"])
    writer.update(1, "acme", make_state(pending=1))
    await seal(writer)
    restored = Ledger(MemoryEventSink(), TOPIC)
    n = restored.restore([(r.partition or 0, r.key, r.value) for r in sink.on(TOPIC)])
    assert n == 5
    assert restored.reservation("r1") is None
    assert restored.reservation("r2") == make_reservation(admit_offset=1)
    assert restored.state("acme") == make_state(pending=1)


async def test_ledger_restore_skips_an_unreadable_record_and_keeps_the_rest():
    restored = Ledger(MemoryEventSink(), TOPIC)
    restored.restore([(0, b"t/acme", b"{not json"),
                      (0, b"t/globex", make_state().model_dump_json().encode())])
    assert restored.state("acme") is None and restored.state("globex") == make_state()


async def test_ledger_drop_forgets_only_the_revoked_partitions():
    ledger = Ledger(MemoryEventSink(), TOPIC)
    ledger.open(0, "r0", make_reservation(tenant="acme"))
    ledger.open(3, "r3", make_reservation(tenant="globex"))
    ledger.update(0, "acme", make_state())
    ledger.update(3, "globex", make_state())
    await seal(ledger)
    ledger.drop({3})
    assert ledger.tenants() == ["acme"] and ledger.reservation("r3") is None
    assert ledger.reservation("r0") is not None


async def test_ledger_stage_holds_the_batch_before_anything_is_written():
    sink = MemoryEventSink()
    ledger = Ledger(sink, TOPIC)
    ledger.update(0, "acme", make_state(pending=1))
    writes = ledger.stage()
    assert writes is not None and sink.records == []  # written only when the loop says
    assert ledger.state("acme") == make_state(pending=1) and ledger.tenants() == ["acme"]
    assert ledger.stage() is None  # the next batch starts empty
    await writes.write()
    assert [r.key for r in sink.on(TOPIC)] == [b"t/acme"]
