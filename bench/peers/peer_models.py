"""The create request, the sleep task's input and the run record in pydantic: the same
fields and limits as Quiesce's msgspec Structs (``service/schemas.py``,
``service/tasks/sleep.py``), written as a FastAPI service would write them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskName = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]
MetadataKey = Annotated[str, Field(min_length=1, max_length=63)]
MetadataValue = Annotated[str, Field(max_length=1024)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=64)]
#: Idempotency-Key: 1 to 255 visible ASCII characters.
IDEMPOTENCY_KEY = {"min_length": 1, "max_length": 255, "pattern": r"^[!-~]+$"}
#: How long a run's keys are kept (Quiesce's default retention: a day).
RETENTION_SECONDS = 24 * 3600
DEFAULT_TIMEOUT_SECONDS = 3600.0


class CreateRun(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task: TaskName
    input: dict[str, Any] = {}
    timeout_seconds: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
    callback_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    metadata: Metadata = {}


class SleepInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    seconds: Annotated[float, Field(ge=0, le=86400)]
    steps: Annotated[int, Field(ge=1, le=998)] = 1


#: The registered tasks and their input models.
INPUTS: dict[str, type[BaseModel]] = {"sleep": SleepInput}


class RunRecord(BaseModel):
    run_id: str
    task: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    worker_id: str
    metadata: dict[str, str] = {}
    timeout_seconds: float
    callback_url: str | None = None
    output: Any = None
    error: dict[str, str] | None = None
    attempt: int = 1
    max_attempts: int = 1
