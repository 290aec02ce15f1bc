"""``/v1/webhooks`` (WebhookService): a tenant's endpoints for its events, their delivery log and a test ping."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from service.calls import Calls
from service.http.deps import PageSize, PageToken, calls
from service.http.errors import COMMON_ERRORS, error_responses
from service.http.routing import ResourceRoute
from service.resources import (
    DEFAULT_PAGE_SIZE,
    ID_PATTERN,
    CreateWebhookRequest,
    ListWebhookDeliveriesResponse,
    ListWebhooksResponse,
    Webhook,
    WebhookDelivery,
)

router = APIRouter(
    prefix="/v1/webhooks", tags=["webhooks"], route_class=ResourceRoute, responses=error_responses(*COMMON_ERRORS)
)

WebhookId = Annotated[str, Path(pattern=ID_PATTERN, description="the id in webhooks/{webhook}")]


@router.post("", response_model=Webhook, status_code=201, responses=error_responses(429))
async def create_webhook(request: CreateWebhookRequest, api: Calls = Depends(calls)) -> Webhook:
    """Register an endpoint. Its host must resolve to public addresses unless the operator allowed its network
    (GRAFT_WEBHOOK_ALLOWED_NETWORKS); the answer holds the signing ``secret``, the only time it is shown."""
    return await api.create_webhook(request)


@router.get("", response_model=ListWebhooksResponse)
async def list_webhooks(
    page_size: PageSize = DEFAULT_PAGE_SIZE, page_token: PageToken = "", api: Calls = Depends(calls)
) -> ListWebhooksResponse:
    return await api.list_webhooks(page_size, page_token)


@router.post("/{webhook}:test", response_model=WebhookDelivery, responses=error_responses(404))
async def test_webhook(webhook: WebhookId, api: Calls = Depends(calls)) -> WebhookDelivery:
    """Queue a ``webhook.test`` event for this endpoint alone; follow it in its deliveries."""
    return await api.test_webhook(webhook)


@router.get("/{webhook}/deliveries", response_model=ListWebhookDeliveriesResponse, responses=error_responses(404))
async def list_webhook_deliveries(
    webhook: WebhookId,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = "",
    api: Calls = Depends(calls),
) -> ListWebhookDeliveriesResponse:
    """The endpoint's deliveries, newest first: state, tries, the receiver's last status or error."""
    return await api.list_webhook_deliveries(webhook, page_size, page_token)


@router.get("/{webhook}", response_model=Webhook, responses=error_responses(404))
async def get_webhook(webhook: WebhookId, api: Calls = Depends(calls)) -> Webhook:
    return await api.get_webhook(webhook)


@router.delete("/{webhook}", status_code=204, response_class=Response, responses=error_responses(404))
async def delete_webhook(webhook: WebhookId, api: Calls = Depends(calls)) -> Response:
    await api.delete_webhook(webhook)
    return Response(status_code=204)
