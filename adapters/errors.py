"""The errors adapters raise on purpose.

adapters/ is a library of heads and their training that knows nothing of the
service (see docs/architecture.md), so it has its own small hierarchy. The
service translates each kind into its own taxonomy (``service.errors``) where
it calls adapters: ``service.training.adapter_errors_translated``.
"""

from typing import Any


class AdapterError(Exception):
    """Base of the adapters' errors; ``message`` is written for the person who has to act on it."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(AdapterError):
    """The features, labels, configuration or search cannot be trained or evaluated as given."""


class TrainingCancelled(AdapterError):
    """The caller's cancel check asked training to stop."""
