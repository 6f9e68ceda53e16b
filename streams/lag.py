"""Consumer-group lag: log end minus committed offset, summed over a group's partitions."""

from __future__ import annotations

import fnmatch

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


async def group_lags(admin: AIOKafkaAdminClient, ends: AIOKafkaConsumer,
                     patterns: list[str] | None = None) -> dict[str, int]:
    """Records behind the log end per group (groups matching the glob ``patterns``).

    ``admin`` and ``ends`` are started clients of one cluster; ``ends`` only
    reads end offsets. Partitions a group never committed do not count.
    """
    globs = patterns or ["*"]
    groups = sorted(g[0] for g in await admin.list_consumer_groups()
                    if any(fnmatch.fnmatchcase(g[0], p) for p in globs))
    committed: dict[str, dict[TopicPartition, int]] = {}
    for group in groups:
        offsets = await admin.list_consumer_group_offsets(group)
        committed[group] = {tp: m.offset for tp, m in offsets.items() if m.offset >= 0}
    partitions = sorted({tp for offsets in committed.values() for tp in offsets})
    end = await ends.end_offsets(partitions) if partitions else {}
    return {g: sum(max(0, end[tp] - off) for tp, off in committed[g].items()) for g in groups}
