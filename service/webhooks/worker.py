"""Each replica's delivery worker: claims due deliveries under a lease, signs and sends them, records each try.

Sends (and registrations, which resolve the URL's host) run in a pool of GRAFT_WEBHOOK_SENDERS threads of their
own, so a slow receiver or name server never holds a thread the store or the doors need; the URL is vetted again
before each try (DNS rebinding), and a refused address fails the try with the policy's message in the log.
"""

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from service.calls import run_in
from service.errors import GraftError
from service.webhooks import sender
from service.webhooks.signing import signed_headers
from service.webhooks.store import Claimed, WebhookStore

log = logging.getLogger(__name__)


class DeliveryWorker:
    def __init__(self, store: WebhookStore, owner: str | None = None) -> None:
        self.store = store
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool = ThreadPoolExecutor(store.settings.webhook_senders, thread_name_prefix="webhook")

    async def run(self) -> None:
        """Forever: claim, send, record; then wait GRAFT_WEBHOOK_POLL_S unless a full batch was claimed."""
        settings = self.store.settings
        while True:
            try:
                sent = await self.deliver_due()
            except Exception:
                log.exception("webhook deliveries failed; trying again in %.1f s", settings.webhook_poll_s)
                sent = 0
            if sent < settings.webhook_senders:
                await asyncio.sleep(settings.webhook_poll_s)

    async def deliver_due(self) -> int:
        """One round: the deliveries due now, sent at once; returns how many were tried."""
        claimed = await run_in(self.pool, self.store.claim, self.owner, self.store.settings.webhook_senders)
        await asyncio.gather(*(run_in(self.pool, self.attempt, c) for c in claimed))
        return len(claimed)

    def attempt(self, claimed: Claimed) -> bool:
        """One try of ``claimed``, recorded; True when it was delivered."""
        status, error = None, None
        try:
            target = self.store.policy.vet(claimed.url)
            body = json.dumps(claimed.payload, separators=(",", ":")).encode()
            headers = signed_headers(claimed.secret, int(time.time()), body, claimed.event_type, claimed.id)
            status = sender.post(target, body, headers, self.store.settings.webhook_timeout_s)
            if not 200 <= status < 300:
                error = f"the receiver answered HTTP {status}"
        except GraftError as exc:
            error = exc.message
        except Exception as exc:  # the receiver's fault (refused, reset, timed out, bad TLS): logged for its owner
            error = sender.describe(exc)
        self.store.record(self.owner, claimed, status, error)
        return error is None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
