"""JSON Schema files for every event contract (for non-Python producers)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import ALL_EVENTS


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in ALL_EVENTS:
        path = directory / f"{model.__name__}.schema.json"
        schema = model.model_json_schema(mode="validation")
        schema["$id"] = f"https://tokenweir.dev/schemas/v1/{model.__name__}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
