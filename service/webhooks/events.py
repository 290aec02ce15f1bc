"""The event types a webhook may subscribe to: one registry (tests/unit/test_webhooks.py checks the copies)."""

from enum import Enum


class EventType(str, Enum):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    BATCH_PREDICTION_FINISHED = "batch_prediction.finished"
    HEAD_VERSION_DRIFTING = "head_version.drifting"
    WEBHOOK_TEST = "webhook.test"  # sent by :test to the one endpoint asked, whatever it subscribed to


SUBSCRIBABLE = tuple(event for event in EventType if event is not EventType.WEBHOOK_TEST)
