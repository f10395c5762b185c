"""Typed identifiers (appliance/core/ids.py): what the gateway checks is what a service receives."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote, unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from appliance.core.errors import APIError
from appliance.core.ids import CollectionName, DocumentId, Identifier, JobId, KeyId, ModelId, ResponseId
from appliance.core.rag_wire import is_collection_name, validate_collection_name
from appliance.core.request_id import is_sane

KINDS: tuple[type[Identifier], ...] = (CollectionName, DocumentId, JobId, KeyId, ModelId, ResponseId)


@pytest.mark.parametrize("raw", ["payroll\n", "payroll\r\n", "payroll\x00", " payroll", "payroll ", "Payroll",
                                 "p\u0430yroll", "\uff50ayroll", "payroll/", "payroll?", "payroll#", "payroll%0A",
                                 "../x", "pay\\roll", "", "a" * 64, "-payroll", "payroll\u0301"])
def test_collection_names_that_are_not_exactly_a_name_are_refused(raw: str) -> None:
    with pytest.raises(APIError) as refused:
        CollectionName.parse(raw, param="name")
    assert refused.value.status == 400 and refused.value.code == "invalid_collection_name"
    assert raw not in refused.value.message or not raw  # the raw text is not echoed back
    assert not is_collection_name(raw)


@given(st.text(max_size=80))
@example("payroll\n")  # issue 32: re.match with "$" accepted a trailing newline
@example("payroll%0A")
def test_a_parsed_identifier_is_its_own_url_segment_and_plain_ascii(raw: str) -> None:
    for kind in KINDS:
        if not kind.matches(raw):
            with pytest.raises(APIError):
                kind.parse(raw, param="x")
            continue
        value = kind.parse(raw, param="x")
        assert value == raw and isinstance(value, kind)
        assert value.isascii() and value.isprintable() and not any(c.isspace() for c in value)
        assert unquote(value.segment()) == value and "/" not in value.segment()
        assert unicodedata.normalize("NFKC", value) == value
        if kind is not ModelId:  # only model ids may have "/" between parts (org/model)
            assert value.segment() == value and quote(value, safe="") == value


def test_the_anchored_form_is_for_json_schema_and_the_old_helpers_use_the_same_rule() -> None:
    assert CollectionName.anchored() == "^(?:[a-z0-9][a-z0-9_-]{0,62})$"
    assert validate_collection_name("handbook") == CollectionName("handbook")
    with pytest.raises(APIError):
        validate_collection_name("handbook\n")
    assert ModelId.matches("org/model-7b:q4") and not ModelId.matches("org//model") and not ModelId.matches("")
    assert KeyId.matches("key_0a1b2c3d4e5f") and not KeyId.matches("key_0a1b\n")
    with pytest.raises(ValueError, match="not a valid"):
        DocumentId.trusted("doc_x/../y")


@pytest.mark.parametrize("raw", ["req-1\n", "req 1", "a" * 129, "", "réq"])
def test_a_request_id_with_anything_but_plain_characters_is_not_kept(raw: str) -> None:
    assert not is_sane(raw)
    assert is_sane("req-1.a:b_c")
