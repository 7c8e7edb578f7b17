"""Job records as both backends store them: states, the row -> ``Job`` mapping, specs without images.

A job row holds its specs as JSON *without* the control images: those live once in the output store
(``serve_app/storage.py``) under a key each spec names, so a status poll never reads them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from deployments.contract import GenerationSpec

ACTIVE = ("in_queue", "in_progress")
FINAL = ("succeeded", "failed", "canceled")
CANCELED = {"code": "CANCELED", "message": "canceled by request", "details": {}}
_WEBHOOK_NAMESPACE = uuid.UUID("5b0c52d6-6a53-4a43-9d55-0f6f8c1a2e77")  # any fixed UUID: ids stay stable

# A job's webhook delivery: pending from submit until delivered or failed (sent once the job is final).
WEBHOOK_STATES = ("pending", "delivered", "failed")

# Columns a status poll needs: everything but the specs (and the delivery's lease).
SUMMARY_COLUMNS = (
    "id, owner, idempotency_key, status, model, num_prompts, progress, outputs, error, metadata, attempts, "
    "cancel_requested, lease_owner, lease_until, created_at, started_at, finished_at, "
    "webhook_url, webhook_state, webhook_attempts, webhook_next_at, event_seq"
)
# A final job's progress stage: it says the job is over, whatever stage it was in when it ended.
DONE_STAGE = "done"


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
    webhook_url: str | None = None
    webhook_state: str | None = None  # one of WEBHOOK_STATES; None without a webhook
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)
    webhook_next_at: float = 0.0  # epoch seconds (the database's clock) before which no attempt starts
    event_seq: int = 0  # the number of the job's last event (``JobEvent.seq``); 0 for none

    @property
    def specs(self) -> list[StoredSpec]:
        if self.specs_json is None:
            raise ValueError(f"job {self.id} was read without its specs")
        return [StoredSpec.from_json(s) for s in json.loads(self.specs_json)]

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def webhook_id(self) -> str:
        """The delivery's id (a job has at most one): the same on every attempt, so receivers can dedupe."""
        return str(uuid.uuid5(_WEBHOOK_NAMESPACE, self.id))


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
        webhook_url=row["webhook_url"],
        webhook_state=row["webhook_state"],
        webhook_attempts=_json(row["webhook_attempts"], []),
        webhook_next_at=float(row["webhook_next_at"]),
        event_seq=int(row["event_seq"]) if "event_seq" in keys else 0,
    )


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event log: its status, progress, attempts and start as one write left them.

    Every write that changes a job's status or progress appends one, numbered 1, 2, ... per job in
    the same transaction, so a reader that asks for the events after the last one it saw (the
    ``/events`` stream, which polls) misses none, however short a stage was.
    """

    seq: int
    status: str
    progress: dict[str, Any]
    attempts: int
    started_at: float | None
    at: float  # epoch seconds

    @property
    def final(self) -> bool:
        return self.status in FINAL


def row_to_event(row: Mapping[str, Any]) -> JobEvent:
    return JobEvent(seq=int(row["seq"]), status=row["status"], progress=_json(row["progress"], {}),
                    attempts=int(row["attempts"]), started_at=row["started_at"], at=float(row["at"]))


def final_progress(progress: dict[str, Any], status: str, num_prompts: int) -> dict[str, Any]:
    """The progress a job keeps once it is final: stage ``done``; a succeeded job shows every step done."""
    done = {**progress, "stage": DONE_STAGE}
    if status == "succeeded":
        done.update(prompt_index=max(0, num_prompts - 1), step=done.get("total_steps", 0))
    return done


def initial_progress(specs: list[StoredSpec]) -> dict[str, Any]:
    return {"prompt_index": 0, "num_prompts": len(specs), "stage": "queued", "step": 0,
            "total_steps": specs[0].spec.steps if specs else 0}


def specs_to_json(specs: list[StoredSpec]) -> str:
    return json.dumps([s.to_json() for s in specs])
