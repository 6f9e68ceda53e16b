"""Idempotent topic provisioning from the registry, through the admin client."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import BaseModel

from infra import InfraError
from schemas.config import Settings
from streams.topics import TopicSpec, registry


class ProvisionReport(BaseModel):
    created: list[str] = []
    unchanged: list[str] = []
    # Partition counts are never changed in place: that would re-key tenants.
    mismatched: list[str] = []

    @property
    def changed(self) -> bool:
        return bool(self.created)


async def existing_partitions(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    present = set(await admin.list_topics())
    wanted = [n for n in names if n in present]
    if not wanted:
        return {}
    described = await admin.describe_topics(wanted)
    return {t["topic"]: len(t["partitions"]) for t in described if t.get("error_code", 0) == 0}


async def provision(settings: Settings) -> ProvisionReport:
    specs = registry(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=15000)
    try:
        await admin.start()
        have = await existing_partitions(admin, [s.name for s in specs])
        report = ProvisionReport()
        missing: list[TopicSpec] = []
        for spec in specs:
            if spec.name not in have:
                missing.append(spec)
            elif have[spec.name] != spec.partitions:
                report.mismatched.append(
                    f"{spec.name}: has {have[spec.name]} partitions, registry says "
                    f"{spec.partitions}")
            else:
                report.unchanged.append(spec.name)
        if missing:
            await _create(admin, missing)
            report.created = [s.name for s in missing]
        return report
    except KafkaError as exc:
        raise InfraError(f"provisioning topics on {settings.bootstrap}: {exc!r}") from exc
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
    new = [NewTopic(name=s.name, num_partitions=s.partitions, replication_factor=1,
                    topic_configs=s.configs()) for s in specs]
    try:
        response = await admin.create_topics(new, timeout_ms=15000)
    except TopicAlreadyExistsError:
        return  # another `up` raced us to it: the outcome is the same
    errors = [(t[0], t[1], t[2]) for t in getattr(response, "topic_errors", [])
              if t[1] not in (0, TopicAlreadyExistsError.errno)]
    if errors:
        raise InfraError(f"creating topics failed: {errors}")
