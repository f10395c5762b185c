"""The Responses API (``/v1/responses``) over the chat path: request types, translation, presentation, store."""

from gateway.responses.events import ResponseEvents
from gateway.responses.lifecycle import ResponsesLifecycle
from gateway.responses.output import ResponsesOutput
from gateway.responses.request import ResponsesRequest
from gateway.responses.store import ResponseStore, StoredResponse
from gateway.responses.translate import Turn, chat_payload

__all__ = [
    "ResponseEvents",
    "ResponseStore",
    "ResponsesLifecycle",
    "ResponsesOutput",
    "ResponsesRequest",
    "StoredResponse",
    "Turn",
    "chat_payload",
]
