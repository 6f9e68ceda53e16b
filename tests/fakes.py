"""An in-memory consumer group of one member: the :class:`streams.consumer.GroupConsumer`
seam that workers and the ClickHouse sink consume through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import ConsumerRecord

from streams.consumer import Record


class FakeGroupConsumer:
    """Partitions given up front, all assigned; ``trace`` records stops and commits in order."""

    def __init__(self, partitions: dict[str, int], trace: list[str] | None = None) -> None:
        self.log: dict[TopicPartition, list[Record]] = {
            TopicPartition(t, p): [] for t, n in partitions.items() for p in range(n)}
        self.position = dict.fromkeys(self.log, 0)
        self.assigned: set[TopicPartition] = set(self.log)
        self.paused_tps: set[TopicPartition] = set()
        self.committed: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []
        self.on_commit: Callable[[dict[TopicPartition, int]], None] | None = None
        self.fail_commits = 0  # the next commits raise CommitFailedError
        self.listener: ConsumerRebalanceListener | None = None
        self.trace = trace if trace is not None else []
        self.stopped = False
        self.ever_paused = False

    def produce(self, topic: str, value: bytes, partition: int = 0, *,
                headers: list[tuple[str, bytes]] | None = None) -> int:
        tp = TopicPartition(topic, partition)
        offset = len(self.log[tp])
        self.log[tp].append(ConsumerRecord(
            topic=topic, partition=partition, offset=offset, timestamp=0, timestamp_type=0,
            key=b"k", value=value, checksum=None, serialized_key_size=1,
            serialized_value_size=len(value), headers=headers or []))
        return offset

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None:
        # Every topic the fake holds must be one the member asked for.
        assert {tp.topic for tp in self.log} <= set(topics)
        self.listener = listener

    async def start(self) -> None:
        assert self.listener is not None
        # A (re)started member fetches from the commit points.
        self.position = {tp: self.committed.get(tp, 0) for tp in self.log}
        await self.listener.on_partitions_assigned(set(self.assigned))

    async def stop(self) -> None:
        self.stopped = True
        self.trace.append("stop")

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        budget = max_records or 1_000_000
        out: dict[TopicPartition, list[Record]] = {}
        for tp in sorted(self.assigned - self.paused_tps):
            records = self.log[tp][self.position[tp]:self.position[tp] + budget]
            if records:
                out[tp] = records
                self.position[tp] += len(records)
                budget -= len(records)
        if not out:
            await asyncio.sleep(min(timeout_ms, 10) / 1000)
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_tps.update(partitions)
        self.ever_paused = True

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_tps.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.position[partition] = offset

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        assert offsets
        if unassigned := set(offsets) - self.assigned:
            raise AssertionError(f"commit of unassigned {sorted(unassigned)}")
        if self.fail_commits:
            self.fail_commits -= 1
            raise CommitFailedError("rebalanced")
        if self.on_commit is not None:
            self.on_commit(offsets)
        self.commits.append(dict(offsets))
        self.committed.update(offsets)
        self.trace.append("commit " + ",".join(f"{tp.topic}/{tp.partition}={o}"
                                               for tp, o in sorted(offsets.items())))

    async def rebalance(self, assigned: set[TopicPartition]) -> None:
        """An eager rebalance: revoke everything, assign ``assigned`` from the commit points."""
        assert self.listener is not None
        await self.listener.on_partitions_revoked(set(self.assigned))
        for tp in assigned:
            self.position[tp] = self.committed.get(tp, 0)
        self.assigned = set(assigned)
        self.paused_tps &= self.assigned
        await self.listener.on_partitions_assigned(set(assigned))
