"""``/v1/jobs``: training runs in the background; poll a job, or follow it as server-sent events."""

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.calls import KeyCheck, while_key_valid
from service.errors import Unauthenticated
from service.http.deps import runtime, tenant
from service.http.errors import error_body
from service.jobs import JobInfo
from service.runtime import Runtime
from service.training import TrainRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class JobList(BaseModel):
    jobs: list[JobInfo]
    next_page_token: str | None = None


@router.post("", response_model=JobInfo, status_code=202)
async def create_job(request: TrainRequest, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> JobInfo:
    """Queue a training job; it returns at once with the job's id and state ``queued``."""
    return await rt.jobs.submit(who, request)


@router.get("", response_model=JobList)
def list_jobs(
    page_size: int = Query(50, ge=1, le=1000),
    page_token: str | None = None,
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> JobList:
    jobs, token = rt.jobs.list(who, page_size, page_token)
    return JobList(jobs=jobs, next_page_token=token)


@router.get("/{job_id}:watch", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def watch_job(
    job_id: str, request: Request, rt: Runtime = Depends(runtime), who: str = Depends(tenant)
) -> StreamingResponse:
    """Server-sent events: one ``data: <Job JSON>`` per change, until the job ends.

    The key is checked again every GRAFT_KEY_RECHECK_S: once revoked, the stream ends with one
    ``event: error`` whose data is the usual ``{code, message, details}`` body.
    """
    updates = rt.jobs.watch(who, job_id)
    first = await anext(updates)  # raises NotFound before the stream starts
    key = KeyCheck(rt.tenants, request.headers.get("authorization"), who, rt.settings.key_recheck_s)

    async def events() -> AsyncIterator[str]:
        yield f"data: {first.model_dump_json()}\n\n"
        try:
            async for job in while_key_valid(updates, key):
                yield f"data: {job.model_dump_json()}\n\n"
        except Unauthenticated as exc:
            yield f"event: error\ndata: {json.dumps(error_body(exc.code, exc.message, exc.details))}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("/{job_id}", response_model=JobInfo)
def get_job(job_id: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> JobInfo:
    return rt.jobs.get(who, job_id)


@router.post("/{job_id}:cancel", response_model=JobInfo)
async def cancel_job(job_id: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> JobInfo:
    return await rt.jobs.cancel(who, job_id)
