"""Tenants, keys and per-model costs: the control-plane configuration file (TOML).

    auth_required = true

    [models.tiny-llama]           # a schemas.cost.CostModel
    alpha = 0.001
    beta = 0.01
    capacity_mu_per_min = 6000

    [tenants.acme]
    plan = "provisioned"
    reservation_mu_per_min = 600
    limit_mu_per_min = 1200
    burst_mu = 200

    [keys.acme-key-1]
    tenant = "acme"
    secret = "<64 hex chars>"

The file is re-read when it changes; agents apply it without a restart.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.cost import CostModel
from schemas.errors import ConfigError
from schemas.events import Priority

MuPerMin = Annotated[float, Field(ge=0)]


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: Literal["provisioned", "pay_per_token"] = "pay_per_token"
    limit_mu_per_min: MuPerMin = 600.0  # sustained MU/min
    burst_mu: Annotated[float, Field(ge=0)] = 100.0  # MU admitted above the rate at once
    reservation_mu_per_min: MuPerMin = 0.0  # provisioned capacity, never taken away
    priority: Priority = "normal"

    @model_validator(mode="after")
    def _reservation_fits_plan(self) -> TenantConfig:
        if self.plan == "pay_per_token" and self.reservation_mu_per_min > 0:
            raise ConfigError("pay_per_token tenants hold no reservation")
        if self.reservation_mu_per_min > self.limit_mu_per_min:
            raise ConfigError("a reservation above the tenant's own limit can never be used")
        return self


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    secret: Annotated[str, Field(pattern=r"^[0-9a-f]{32,128}$")]  # hex


class ControlPlaneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    auth_required: bool = True
    models: dict[str, CostModel] = {}
    tenants: dict[str, TenantConfig] = {}
    # Applies to tenants not listed (pay-per-token); None rejects unknown tenants.
    default_tenant: TenantConfig | None = TenantConfig()
    keys: dict[str, ApiKey] = {}
    # [scaling]: the autoscaler's settings, validated by agents.autoscaler.AutoscalerConfig
    # when the autoscaler loads them (schemas does not depend on agents).
    scaling: dict[str, Any] = {}

    def tenant(self, name: str) -> TenantConfig | None:
        return self.tenants.get(name, self.default_tenant)

    def cost(self, model: str) -> CostModel:
        return self.models.get(model) or CostModel()

    def reserved_mu_per_min(self) -> float:
        return sum(t.reservation_mu_per_min for t in self.tenants.values())


def load_config(path: Path) -> ControlPlaneConfig:
    try:
        doc = tomllib.loads(path.read_text())
        return ControlPlaneConfig.model_validate(doc)
    except FileNotFoundError as exc:
        raise ConfigError(f"control-plane config {path} not found") from exc
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"control-plane config {path}: {exc}") from exc
