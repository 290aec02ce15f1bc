"""``/v1/datasets``: labelled images, uploaded as multipart files + labels or as a class-folder zip."""

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from pydantic import BaseModel

from service.errors import InvalidArgument
from service.http.deps import runtime, tenant
from service.runtime import Runtime
from service.store.datasets import DatasetInfo

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]
    next_page_token: str | None = None


@router.post("", response_model=DatasetInfo, status_code=201)
def create_dataset(
    name: str = Form(..., description="a display name"),
    files: list[UploadFile] | None = File(None, description="images; give one `labels` field per file, in order"),
    labels: list[str] | None = Form(None, description="one label per file, in the same order"),
    archive: UploadFile | None = File(None, description="or: a zip in class-folder layout (label/image.jpg)"),
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> DatasetInfo:
    """Upload a dataset. Every file is validated before anything is stored.

    The gate bounded the body (GRAFT_MAX_UPLOAD_BYTES) while it streamed to spooled files; the store reads
    those files one at a time, so the upload is never held in memory whole.
    """
    if archive is not None and files:
        raise InvalidArgument("send either `files` with `labels` or one zip `archive`, not both")
    if archive is not None:
        return rt.core.datasets.create_from_zip(who, name, archive.file)
    if not files:
        raise InvalidArgument("send images as `files` (with one `labels` field each) or a zip as `archive`")
    uploads = [(upload.filename or f"file {i}", upload.file) for i, upload in enumerate(files)]
    return rt.core.datasets.create_from_labelled(who, name, uploads, labels or [])


@router.get("", response_model=DatasetList)
def list_datasets(
    page_size: int = Query(50, ge=1, le=1000),
    page_token: str | None = None,
    rt: Runtime = Depends(runtime),
    who: str = Depends(tenant),
) -> DatasetList:
    datasets, token = rt.core.datasets.list(who, page_size, page_token)
    return DatasetList(datasets=datasets, next_page_token=token)


@router.get("/{dataset_id}", response_model=DatasetInfo)
def get_dataset(dataset_id: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> DatasetInfo:
    return rt.core.datasets.get(who, dataset_id)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: str, rt: Runtime = Depends(runtime), who: str = Depends(tenant)) -> Response:
    rt.core.datasets.delete(who, dataset_id)
    return Response(status_code=204)
