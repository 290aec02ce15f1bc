"""``/v1/jobs`` (JobService): training runs in the background; poll a job, or follow it as server-sent events."""

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import StreamingResponse

from service.calls import Calls
from service.errors import Unauthenticated
from service.http.deps import IdempotencyKey, PageSize, PageToken, calls
from service.http.errors import COMMON_ERRORS, error_body, error_responses
from service.http.routing import ResourceRoute
from service.resources import (
    DEFAULT_PAGE_SIZE,
    ID_PATTERN,
    Job,
    ListJobsResponse,
    TrainingSpec,
)

router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], route_class=ResourceRoute, responses=error_responses(*COMMON_ERRORS)
)

JobId = Annotated[str, Path(pattern=ID_PATTERN, description="the id in jobs/{job}")]


@router.post("", response_model=Job, status_code=202, responses=error_responses(404, 409, 429))
async def create_job(spec: TrainingSpec, idempotency_key: IdempotencyKey = None, api: Calls = Depends(calls)) -> Job:
    """Queue a training job; it returns at once with the job's name and state ``queued``.

    With an ``Idempotency-Key``, a repeat of the same spec answers the same job: one is created."""
    return await api.create_job(spec, idempotency_key)


@router.get("", response_model=ListJobsResponse)
async def list_jobs(
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = "",
    api: Calls = Depends(calls),
) -> ListJobsResponse:
    return await api.list_jobs(page_size, page_token)


@router.get(
    "/{job}:watch",
    response_class=StreamingResponse,
    responses=error_responses(404) | {200: {"content": {"text/event-stream": {}}}},
)
async def watch_job(job: JobId, api: Calls = Depends(calls)) -> StreamingResponse:
    """Server-sent events: one ``data: <Job JSON>`` per change, until the job ends.

    The key is checked again every GRAFT_KEY_RECHECK_S: once revoked, the stream ends with one
    ``event: error`` whose data is the usual ``{code, message, details}`` body.
    """
    updates = await api.watch_job(job)  # raises NotFound before the stream starts

    async def events() -> AsyncIterator[str]:
        try:
            async for update in updates:
                yield f"data: {update.model_dump_json()}\n\n"
        except Unauthenticated as exc:
            yield f"event: error\ndata: {json.dumps(error_body(exc.code, exc.message, exc.details))}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/{job}:cancel", response_model=Job, responses=error_responses(404, 409))
async def cancel_job(job: JobId, api: Calls = Depends(calls)) -> Job:
    return await api.cancel_job(job)


@router.get("/{job}", response_model=Job, responses=error_responses(404))
async def get_job(job: JobId, api: Calls = Depends(calls)) -> Job:
    return await api.get_job(job)
