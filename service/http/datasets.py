"""``/v1/datasets`` (DatasetService): labelled images, uploaded as multipart files + labels or as a class-folder zip."""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Response, UploadFile

from service.calls import Calls
from service.errors import InvalidArgument
from service.http.deps import calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.resources import (
    DEFAULT_PAGE_SIZE,
    DISPLAY_NAME_PATTERN,
    ID_PATTERN,
    MAX_PAGE_SIZE,
    Dataset,
    ListDatasetsResponse,
)
from service.store.datasets import MAX_NAME_CHARS

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=error_responses(*COMMON_ERRORS))

DatasetId = Annotated[str, Path(pattern=ID_PATTERN, description="the id in datasets/{dataset}")]


@router.post("", response_model=Dataset, status_code=201, responses=error_responses(409, 429))
async def create_dataset(
    display_name: str = Form(..., min_length=1, max_length=MAX_NAME_CHARS, pattern=DISPLAY_NAME_PATTERN),
    files: list[UploadFile] | None = File(None, description="images; give one `labels` field per file, in order"),
    labels: list[str] | None = Form(None, description="one label per file, in the same order"),
    archive: UploadFile | None = File(None, description="or: a zip in class-folder layout (label/image.jpg)"),
    api: Calls = Depends(calls),
) -> Dataset:
    """Upload a dataset: `files` with `labels`, or one zip `archive`. Every file is validated before anything is stored.

    The gate bounded the body (GRAFT_MAX_UPLOAD_BYTES) while it streamed to spooled files; the store reads
    those files one at a time, so the upload is never held in memory whole.
    """
    store = api.core.datasets
    if archive is not None and files:
        raise InvalidArgument("send either `files` with `labels` or one zip `archive`, not both")
    if archive is not None:
        return await api.create_dataset(store.create_from_zip, display_name, archive.file)
    if not files:
        raise InvalidArgument("send images as `files` (with one `labels` field each) or a zip as `archive`")
    uploads = [(upload.filename or f"file {i}", upload.file) for i, upload in enumerate(files)]
    return await api.create_dataset(store.create_from_labelled, display_name, uploads, labels or [])


@router.get("", response_model=ListDatasetsResponse)
async def list_datasets(
    page_size: int = Query(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
    page_token: str = "",
    api: Calls = Depends(calls),
) -> ListDatasetsResponse:
    return await api.list_datasets(page_size, page_token)


@router.get("/{dataset}", response_model=Dataset, responses=error_responses(404))
async def get_dataset(dataset: DatasetId, api: Calls = Depends(calls)) -> Dataset:
    return await api.get_dataset(dataset)


@router.delete("/{dataset}", status_code=204, response_class=Response, responses=error_responses(404, 409))
async def delete_dataset(dataset: DatasetId, api: Calls = Depends(calls)) -> Response:
    await api.delete_dataset(dataset)
    return Response(status_code=204)
