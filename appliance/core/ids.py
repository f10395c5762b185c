"""Identifiers that cross a hop, parsed once at the edge into typed values.

A collection name, document id, job id, key id or model id arrives as raw text from a client (a
path segment the HTTP server already percent-decoded, or a JSON string). It is parsed here, once,
into a subclass of ``str`` that can only be made by :meth:`parse` (or :meth:`trusted`, for values
this code minted itself): every later step — the owner check, the internal URL, the store key —
takes the typed value, so what is checked is exactly what is forwarded and stored.

Every pattern is matched whole (``fullmatch``) against ASCII only: no control characters, no
percent escapes, no separators (``/``, ``?``, ``#``, ``\\``), no whitespace, no dot segments, no
Unicode lookalikes or other normalisation forms. The service that owns an identifier refuses what
its pattern refuses, with the same pattern (this module), so the gateway and the service can never
disagree about which name is meant. :meth:`segment` escapes the value for a URL path anyway
(a no-op for every valid value), so a pattern loosened later still cannot cut a path short.
"""

from __future__ import annotations

import re
import secrets
from typing import ClassVar, Self, TypeGuard
from urllib.parse import quote

from appliance.core.errors import bad_request

__all__ = [
    "COLLECTION_NAME_RULE", "BatchId", "CollectionName", "DocumentId", "FileId", "Identifier", "JobId", "KeyId",
    "ModelId", "ResponseId",
]

COLLECTION_NAME_RULE = "[a-z0-9][a-z0-9_-]{0,62}"


class Identifier(str):
    """Base of the typed identifiers; subclasses set the pattern and how it is described."""

    __slots__ = ()
    rule: ClassVar[str]
    described: ClassVar[str]
    code: ClassVar[str]
    _compiled: ClassVar[re.Pattern[str]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._compiled = re.compile(cls.rule, re.ASCII)

    @classmethod
    def matches(cls, raw: object) -> TypeGuard[str]:
        return isinstance(raw, str) and cls._compiled.fullmatch(raw) is not None

    @classmethod
    def parse(cls, raw: object, *, param: str) -> Self:
        """The typed value, or an OpenAI-shaped 400 naming ``param`` (the raw text is not echoed)."""
        if not cls.matches(raw):
            raise bad_request(f"Invalid {param}: it must be {cls.described}.", param=param, code=cls.code)
        return cls(raw)

    @classmethod
    def trusted(cls, value: str) -> Self:
        """A value this code produced itself (a stored name, a minted id); still checked, never silently."""
        if not cls.matches(value):
            raise ValueError(f"not a valid {cls.__name__}")
        return cls(value)

    @classmethod
    def anchored(cls) -> str:
        """The pattern for JSON Schema / pydantic (``$`` there means the end of the text)."""
        return f"^(?:{cls.rule})$"

    def segment(self) -> str:
        """The value as one URL path segment."""
        return quote(str(self), safe="")


class CollectionName(Identifier):
    __slots__ = ()
    rule = COLLECTION_NAME_RULE
    described = "1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"
    code = "invalid_collection_name"


class DocumentId(Identifier):
    __slots__ = ()
    rule = "doc_[A-Za-z0-9]{1,64}"
    described = "a document id as the service returned it (doc_ and letters or digits)"
    code = "invalid_document_id"


class JobId(Identifier):
    __slots__ = ()
    rule = "job_[A-Za-z0-9]{1,64}"
    described = "a job id as the service returned it (job_ and letters or digits)"
    code = "invalid_job_id"


class KeyId(Identifier):
    __slots__ = ()
    rule = "key_[A-Za-z0-9]{1,64}"
    described = "a key id as the gateway returned it (key_ and letters or digits)"
    code = "invalid_key_id"


class ModelId(Identifier):
    """A served model's name: letters, digits and ``._:-``, with ``/`` between parts (``org/model``)."""

    __slots__ = ()
    rule = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._:-]{0,127}){0,3}"
    described = "letters, digits and '.', '_', ':', '-', parts separated by single '/'"
    code = "invalid_model"


class ResponseId(Identifier):
    """A stored response of the Responses API: ``resp_`` and 48 lower-case hex digits, as the gateway mints it."""

    __slots__ = ()
    rule = "resp_[0-9a-f]{48}"
    described = "a response id as the gateway returned it (resp_ and 48 hex digits)"
    code = "invalid_response_id"

    @classmethod
    def mint(cls) -> ResponseId:
        return cls(f"resp_{secrets.token_hex(24)}")


class FileId(Identifier):
    """A file of the Files API (uploaded or a batch's result): ``file-`` and 24 lower-case hex digits."""

    __slots__ = ()
    rule = "file-[0-9a-f]{24}"
    described = "a file id as the gateway returned it (file- and 24 hex digits)"
    code = "invalid_file_id"

    @classmethod
    def mint(cls) -> FileId:
        return cls(f"file-{secrets.token_hex(12)}")


class BatchId(Identifier):
    """A batch of the Batch API: ``batch_`` and 24 lower-case hex digits, as the gateway mints it."""

    __slots__ = ()
    rule = "batch_[0-9a-f]{24}"
    described = "a batch id as the gateway returned it (batch_ and 24 hex digits)"
    code = "invalid_batch_id"

    @classmethod
    def mint(cls) -> BatchId:
        return cls(f"batch_{secrets.token_hex(12)}")
