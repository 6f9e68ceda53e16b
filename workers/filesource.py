"""A file-fed shard source behind the worker's ``consumer=`` seam, for hosts without a broker.

GPU hosts here have no Java, so no Kafka broker: :class:`FileShardConsumer`
feeds :class:`workers.worker.ShardWorker` from a JSON-lines file (one
encoded :class:`schemas.events.InferenceRequest` per line, as
``streams.codec.encode`` writes it), tailing the file as lines are
appended. It is one partition of the model's shard topic; offsets are line
numbers; commits are kept in memory (the file is the log, nothing is
deleted). Pause, resume and seek behave as the worker expects of aiokafka.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO, TypeAlias

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from streams.topics import shard_topic
from workers import WorkersError

Record: TypeAlias = ConsumerRecord[bytes, bytes]


class FileShardConsumer:
    """:class:`workers.worker.ShardConsumer` over a JSON-lines file (see module doc)."""

    def __init__(self, path: Path, *, model: str) -> None:
        self.path = Path(path)
        self.topic = shard_topic(model)
        self.tp = TopicPartition(self.topic, 0)
        self._log: list[Record] = []
        self._file: IO[bytes] | None = None
        self._partial = b""  # a line being appended, not yet ended by a newline
        self._position = 0
        self._paused = False
        self._listener: ConsumerRebalanceListener | None = None
        self.committed: int = 0  # next offset to read after a restart

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None:
        if topics != [self.topic]:
            raise WorkersError(f"file source serves {self.topic!r}, not {topics}")
        self._listener = listener

    async def start(self) -> None:
        self._file = self.path.open("rb")
        if self._listener is not None:
            await self._listener.on_partitions_assigned({self.tp})

    async def stop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read_new(self) -> None:
        if self._file is None:
            return
        chunk = self._file.read()
        if not chunk:
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # empty when the chunk ended with a newline
        for line in lines:
            if not line.strip():
                continue
            offset = len(self._log)
            self._log.append(ConsumerRecord(
                topic=self.topic, partition=0, offset=offset, timestamp=0, timestamp_type=0,
                key=None, value=line, checksum=None, serialized_key_size=0,
                serialized_value_size=len(line), headers=[]))

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        if not self._paused:
            self._read_new()
            budget = max_records or len(self._log)
            records = self._log[self._position:self._position + budget]
            if records:
                self._position += len(records)
                return {self.tp: records}
        # Nothing new: wait as a broker fetch would, briefly, so the loop does not spin.
        await asyncio.sleep(min(timeout_ms, 20) / 1000)
        return {}

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def pause(self, *partitions: TopicPartition) -> None:
        if self.tp in partitions:
            self._paused = True

    def resume(self, *partitions: TopicPartition) -> None:
        if self.tp in partitions:
            self._paused = False

    def paused(self) -> set[TopicPartition]:
        return {self.tp} if self._paused else set()

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition != self.tp:
            raise WorkersError(f"file source has no partition {partition}")
        self._position = offset

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        if offsets and self.tp in offsets:
            self.committed = offsets[self.tp]
