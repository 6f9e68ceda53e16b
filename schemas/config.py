"""Typed runtime configuration (environment variables ``TOKENWEIR_*``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.errors import ConfigError

Port = Annotated[int, Field(ge=1, le=65535)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENWEIR_", extra="forbid", frozen=True)

    # Everything the local stack writes (broker data, logs, pid files, chDB).
    state_dir: Path = Path(".tokenweir")

    # Kafka. When ``kafka_bootstrap`` is set, tokenweir uses that cluster and
    # never starts a broker of its own.
    kafka_bootstrap: str | None = None
    kafka_port: Port = 9092
    kafka_controller_port: Port = 9093
    kafka_heap_mb: Annotated[int, Field(ge=128, le=65536)] = 512
    kafka_start_timeout_s: Annotated[float, Field(gt=0)] = 90.0
    # Jars resolved by Maven are shared by every state directory.
    kafka_jar_dir: Path = Path.home() / ".cache" / "tokenweir" / "kafka-jars"

    # ClickHouse. No URL and no local server: embedded chDB under state_dir.
    clickhouse_url: str | None = None  # clickhouse://host:port
    clickhouse_server: bool = False  # start Debian's clickhouse-server locally
    clickhouse_port: Port = 9000
    clickhouse_database: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")] = "tokenweir"

    # Topology.
    models: Annotated[list[str], Field(min_length=1)] = ["tiny-llama"]
    tenant_partitions: Annotated[int, Field(ge=1, le=1024)] = 8  # tw.requests == tw.usage
    shard_partitions: Annotated[int, Field(ge=1, le=1024)] = 4  # per tw.shard.<model>
    reply_partitions: Annotated[int, Field(ge=1, le=1024)] = 4

    # Tenants, keys, limits and per-model costs (TOML, re-read when it changes).
    # None: built-in defaults, authentication on, no keys (everything is refused).
    control_config: Path | None = None

    # The admission agent's consumer group.
    app_id: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")] = "tokenweir"

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: list[str]) -> list[str]:
        for name in models:
            if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
                raise ConfigError(f"model name {name!r}: use 1-64 of [A-Za-z0-9._-]")
        if len(set(models)) != len(models):
            raise ConfigError(f"models listed twice: {models}")
        return models

    @model_validator(mode="after")
    def _ports_distinct(self) -> Settings:
        if self.kafka_port == self.kafka_controller_port:
            raise ConfigError("kafka_port and kafka_controller_port must differ")
        return self

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def manages_broker(self) -> bool:
        return self.kafka_bootstrap is None

    @property
    def clickhouse_server_url(self) -> str | None:
        if self.clickhouse_url:
            return self.clickhouse_url
        if self.clickhouse_server:
            return f"clickhouse://127.0.0.1:{self.clickhouse_port}"
        return None

    def to_env(self) -> dict[str, str]:
        """These settings as ``TOKENWEIR_*`` variables, for processes we spawn."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            env[f"TOKENWEIR_{name.upper()}"] = (
                json.dumps(value) if isinstance(value, list | dict) else str(value)
            )
        return env

    def run_dir(self) -> Path:
        return self.state_dir / "run"
