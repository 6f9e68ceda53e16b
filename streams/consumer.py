"""The consumer-group seam: the part of :class:`aiokafka.AIOKafkaConsumer` that
workers and the ClickHouse sink use, so tests and GPU hosts without a broker
can hand them another source; and the positioning helpers of the agents that
read a topic's recent past without a group."""

from __future__ import annotations

from typing import Protocol, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class GroupConsumer(Protocol):
    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]: ...
    def assignment(self) -> set[TopicPartition]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None: ...


async def seek_to_time(consumer: AIOKafkaConsumer, partitions: list[TopicPartition],
                       since_s: float) -> None:
    """Put each (assigned) partition at its first record from ``since_s`` (epoch s) on,
    or at its end when it has none that recent."""
    found = await consumer.offsets_for_times(
        {tp: max(0, int(since_s * 1000)) for tp in partitions})
    ends = await consumer.end_offsets(partitions)
    for tp in partitions:
        hit = found.get(tp)
        consumer.seek(tp, hit.offset if hit is not None else ends[tp])


async def behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """Whether any partition's position is still short of its offset in ``ends``."""
    return any([await consumer.position(tp) < end for tp, end in ends.items()])
