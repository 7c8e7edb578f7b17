"""Job records as both backends store them: states, the row -> ``Job`` mapping, specs without images.

A job row holds its specs as JSON *without* the control images: those live once in the output store
(``serve_app/storage.py``) under a key each spec names, so a status poll never reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from deployments.spec import GenerationSpec

ACTIVE = ("in_queue", "in_progress")
FINAL = ("succeeded", "failed", "canceled")
CANCELED = {"code": "CANCELED", "message": "canceled by request", "details": {}}

# Columns a status poll needs: everything but the specs.
SUMMARY_COLUMNS = (
    "id, owner, idempotency_key, status, model, num_prompts, progress, outputs, error, metadata, attempts, "
    "cancel_requested, lease_owner, lease_until, created_at, started_at, finished_at"
)


@dataclass(frozen=True)
class StoredSpec:
    """One prompt of a job as stored: the spec less its image, and where the image is."""

    spec: GenerationSpec
    image_key: str | None  # None only for rows written before images moved out (inline image_png)

    def to_json(self) -> str:
        data = json.loads(self.spec.model_dump_json(exclude={"image_png"}))
        return json.dumps({**data, "image_key": self.image_key})

    @classmethod
    def from_json(cls, text: str) -> "StoredSpec":
        data = json.loads(text)
        key = data.pop("image_key", None)
        if key is not None:
            data["image_png"] = ""  # filled from the store by the runner before dispatch
        return cls(GenerationSpec.model_validate_json(json.dumps(data)), key)


@dataclass
class Job:
    id: str
    owner: str
    idempotency_key: str | None
    status: str
    model: str
    num_prompts: int
    progress: dict[str, Any]
    outputs: list[dict[str, Any]]
    error: dict[str, Any] | None
    metadata: dict[str, Any]
    attempts: int
    cancel_requested: bool
    lease_owner: str | None
    lease_until: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    specs_json: str | None = field(default=None, repr=False)  # only when read with specs=True

    @property
    def specs(self) -> list[StoredSpec]:
        if self.specs_json is None:
            raise ValueError(f"job {self.id} was read without its specs")
        return [StoredSpec.from_json(s) for s in json.loads(self.specs_json)]

    @property
    def final(self) -> bool:
        return self.status in FINAL


def _json(value, default):
    if value is None:
        return default
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def row_to_job(row: Mapping[str, Any]) -> Job:
    """A row of either backend (sqlite3.Row or a psycopg dict row) -> Job."""
    keys = row.keys()
    return Job(
        id=row["id"],
        owner=row["owner"],
        idempotency_key=row["idempotency_key"],
        status=row["status"],
        model=row["model"],
        num_prompts=row["num_prompts"],
        progress=_json(row["progress"], {}),
        outputs=_json(row["outputs"], []),
        error=_json(row["error"], None),
        metadata=_json(row["metadata"], {}),
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        lease_owner=row["lease_owner"],
        lease_until=float(row["lease_until"]),
        created_at=float(row["created_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        specs_json=row["specs"] if "specs" in keys else None,
    )


def initial_progress(specs: list[StoredSpec]) -> dict[str, Any]:
    return {"prompt_index": 0, "num_prompts": len(specs), "stage": "queued", "step": 0,
            "total_steps": specs[0].spec.steps if specs else 0}


def specs_to_json(specs: list[StoredSpec]) -> str:
    return json.dumps([s.to_json() for s in specs])
