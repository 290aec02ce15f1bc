"""``/v1/datasets`` (DatasetService): images, uploaded as multipart files (+ labels) or as a class-folder zip, and
their labels, set one by one, in a batch or by a CSV import."""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile
from pydantic import StringConstraints

from adapters.active import Strategy
from service.auditing import MAX_AUDIT_ITEMS
from service.calls import Calls
from service.errors import InvalidArgument
from service.http.deps import IdempotencyKey, PageSize, PageToken, calls, unless_disconnected
from service.http.errors import COMMON_ERRORS, error_responses
from service.http.routing import ResourceRoute
from service.resources import (
    DEFAULT_PAGE_SIZE,
    DISPLAY_NAME_PATTERN,
    ID_PATTERN,
    STORED_HEAD_REF_PATTERN,
    BatchUpdateExamplesRequest,
    BatchUpdateExamplesResponse,
    Dataset,
    DatasetAudit,
    Example,
    ExampleUpdate,
    ImportLabelsResponse,
    ListDatasetsResponse,
    ListExamplesResponse,
    SuggestExamplesResponse,
)
from service.store.datasets import MAX_CLIENT_ID_CHARS, MAX_LABEL_CHARS, MAX_NAME_CHARS
from service.suggestions import MAX_SUGGESTIONS

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], route_class=ResourceRoute, responses=error_responses(*COMMON_ERRORS)
)

# Empty: that file is unlabelled (a pool's image, labelled later).
Label = Annotated[str, StringConstraints(max_length=MAX_LABEL_CHARS, pattern=f"^$|{DISPLAY_NAME_PATTERN}")]
DatasetId = Annotated[str, Path(pattern=ID_PATTERN, description="the id in datasets/{dataset}")]
# Empty: that file has no client id. The store also refuses an all-digit one (it would read as a position).
ClientId = Annotated[str, StringConstraints(max_length=MAX_CLIENT_ID_CHARS, pattern=r"^[A-Za-z0-9._~-]*$")]
ExampleRef = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_CLIENT_ID_CHARS,
        pattern=r"^[A-Za-z0-9._~-]+$",
        description="the example's client id, or its position in upload order (from 0)",
    ),
]


# Either images with their labels or one zip, never both: a rule of the body as a whole, which FastAPI's
# per-field schema cannot state, so the operation adds it beside the generated schema.
_FILES_OR_ARCHIVE = {
    "oneOf": [
        {"required": ["files"], "not": {"required": ["archive"]}},
        {
            "required": ["archive"],
            "not": {"anyOf": [{"required": ["files"]}, {"required": ["labels"]}, {"required": ["client_ids"]}]},
        },
    ]
}


@router.post(
    "",
    response_model=Dataset,
    status_code=201,
    responses=error_responses(409, 429),
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": _FILES_OR_ARCHIVE}}}},
)
async def create_dataset(
    display_name: str = Form(..., min_length=1, max_length=MAX_NAME_CHARS, pattern=DISPLAY_NAME_PATTERN),
    files: list[UploadFile] = File([], description="images; give one `labels` field per file, in order, or none"),
    labels: list[Label] = Form(
        [], description="one label per file, in the same order (empty: that file is unlabelled); none: all are"
    ),
    client_ids: list[ClientId] = Form(
        [],
        description="optional: your own id per file, in the same order (empty: none for that file); unique within "
        "the dataset, addressable as datasets/{dataset}/examples/{client_id}",
    ),
    archive: UploadFile = File(
        None, description="or: a zip in class-folder layout (label/image.jpg; images at its root are unlabelled)"
    ),
    idempotency_key: IdempotencyKey = None,
    api: Calls = Depends(calls),
) -> Dataset:
    """Upload a dataset: `files` (with `labels`, or without: a pool), or one zip `archive`. Every file is validated
    before anything is stored.

    The gate bounded the body (GRAFT_MAX_UPLOAD_BYTES) while it streamed to spooled files; the store reads
    those files one at a time, so the upload is never held in memory whole. With an ``Idempotency-Key``, a
    repeat with the same display name answers the dataset the first upload made.
    """
    store = api.core.datasets
    if archive is not None and (files or client_ids):
        raise InvalidArgument("send either `files` with `labels` (and `client_ids`) or one zip `archive`, not both")
    if archive is not None:
        return await api.create_dataset(store.create_from_zip, display_name, archive.file, request_id=idempotency_key)
    if not files:
        raise InvalidArgument("send images as `files` (with one `labels` field each) or a zip as `archive`")
    uploads = [(upload.filename or f"file {i}", upload.file) for i, upload in enumerate(files)]
    return await api.create_dataset(
        store.create_from_labelled, display_name, uploads, labels or [], client_ids, request_id=idempotency_key
    )


@router.get("", response_model=ListDatasetsResponse)
async def list_datasets(
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = "",
    api: Calls = Depends(calls),
) -> ListDatasetsResponse:
    return await api.list_datasets(page_size, page_token)


@router.get("/{dataset}:audit", response_model=DatasetAudit, responses=error_responses(404, 429))
async def audit_dataset(
    dataset: DatasetId,
    request: Request,
    backbone: str = Query(
        "", max_length=64, description="default: the server's GRAFT_DEFAULT_BACKBONE (mobilenet_v2 unless configured)"
    ),
    max_suspects: int = Query(0, ge=0, le=MAX_AUDIT_ITEMS, description="0: the default, 50"),
    max_duplicates: int = Query(0, ge=0, le=MAX_AUDIT_ITEMS, description="0: the default, 50"),
    duplicate_similarity: float | None = Query(
        None, gt=0.0, le=1.0, description="cosine similarity from which images count as near-duplicates; default 0.98"
    ),
    api: Calls = Depends(calls),
) -> DatasetAudit:
    """Images whose label is probably wrong, ranked, with a suggested label; near-duplicates under different labels.

    Out-of-fold probabilities of a linear probe on the backbone's cached features, against per-class
    thresholds from those probabilities (adapters/audit.py). Features not yet cached are computed first:
    on a new dataset this takes as long as a training job's extraction. At most GRAFT_MAX_AUDIT_SECONDS;
    a disconnect stops it. ``duplicates_truncated``: the duplicate search stopped after 10,000 candidate pairs
    (duplicate_similarity too low), so duplicate_count is a lower bound.
    """
    call = api.audit_dataset(dataset, backbone, max_suspects, max_duplicates, duplicate_similarity)
    return await unless_disconnected(request, call)


@router.get("/{dataset}:suggest", response_model=SuggestExamplesResponse, responses=error_responses(400, 404, 409, 429))
async def suggest_examples(
    dataset: DatasetId,
    request: Request,
    head: str = Query(
        ..., pattern=STORED_HEAD_REF_PATTERN, description="the judging head version: name, name@3 or name:alias"
    ),
    count: int = Query(0, ge=0, le=MAX_SUGGESTIONS, description="0: the default, 20"),
    strategy: Strategy | None = Query(None, description="default: diverse_margin"),
    seed: int = Query(0, ge=0, le=2**31 - 1, description="the same seed and data give the same answer"),
    api: Calls = Depends(calls),
) -> SuggestExamplesResponse:
    """The dataset's unlabelled images worth labelling next for a head version, best first, each with a reason.

    diverse_margin (the default): the images the head is least sure of (smallest margin between its two likeliest
    classes), grouped in embedding space, and from each group its most typical one, so one answer covers several
    confusions and no two picks are near-duplicates (nor near-duplicates of labelled images). Features not yet
    cached are computed first. Runs in an audit slot, at most GRAFT_MAX_AUDIT_SECONDS; a disconnect stops it.
    """
    call = api.suggest_examples(dataset, head, count, strategy, seed)
    return await unless_disconnected(request, call)


@router.get("/{dataset}/examples", response_model=ListExamplesResponse, responses=error_responses(404))
async def list_examples(
    dataset: DatasetId,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = "",
    api: Calls = Depends(calls),
) -> ListExamplesResponse:
    """The dataset's examples in upload order, each with the file name and client id its upload gave it."""
    return await api.list_examples(dataset, page_size, page_token)


@router.get(
    "/{dataset}/examples/{example}:image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, **error_responses(404)},
)
async def get_example_image(dataset: DatasetId, example: ExampleRef, api: Calls = Depends(calls)) -> Response:
    """The example's image as it was uploaded."""
    content_type, data = await api.get_example_image(dataset, example)
    return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{dataset}/examples/{example}", response_model=Example, responses=error_responses(404))
async def get_example(dataset: DatasetId, example: ExampleRef, api: Calls = Depends(calls)) -> Example:
    """One example, by its client id or by its position (all digits)."""
    return await api.get_example(dataset, example)


@router.patch("/{dataset}/examples/{example}", response_model=Example, responses=error_responses(404))
async def update_example(
    dataset: DatasetId,
    example: ExampleRef,
    body: ExampleUpdate,
    update_mask: str = Query(
        "", pattern=r"^(label|\*)?$", description="optional: 'label' (the only field that can change) or '*'"
    ),
    api: Calls = Depends(calls),
) -> Example:
    """Label one example (`{"label": "cat"}`), or unlabel it (`{"label": null}`)."""
    return await api.update_example(dataset, example, body.label, update_mask)


@router.post(
    "/{dataset}/examples:batchUpdate", response_model=BatchUpdateExamplesResponse, responses=error_responses(404)
)
async def batch_update_examples(
    dataset: DatasetId, body: BatchUpdateExamplesRequest, api: Calls = Depends(calls)
) -> BatchUpdateExamplesResponse:
    """Label several examples, each by client id or position (at most GRAFT_MAX_LABEL_UPDATES): all or none."""
    return await api.batch_update_examples(dataset, body.updates)


@router.post(
    "/{dataset}/examples:importLabels",
    response_model=ImportLabelsResponse,
    responses=error_responses(404),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/csv": {"schema": {"type": "string", "description": "rows of file,label"}}},
        }
    },
)
async def import_labels(dataset: DatasetId, request: Request, api: Calls = Depends(calls)) -> ImportLabelsResponse:
    """Label examples from CSV rows `file,label` (a file name or client id; an empty label unlabels): all or none.

    The body is bounded before it is read (GRAFT_MAX_JSON_BYTES at the gate, GRAFT_MAX_LABEL_IMPORT_BYTES here).
    """
    return await api.import_labels(dataset, await request.body())


@router.get("/{dataset}", response_model=Dataset, responses=error_responses(404))
async def get_dataset(dataset: DatasetId, api: Calls = Depends(calls)) -> Dataset:
    return await api.get_dataset(dataset)


@router.delete("/{dataset}", status_code=204, response_class=Response, responses=error_responses(404, 409))
async def delete_dataset(dataset: DatasetId, api: Calls = Depends(calls)) -> Response:
    await api.delete_dataset(dataset)
    return Response(status_code=204)
