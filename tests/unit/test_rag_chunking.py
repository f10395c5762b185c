"""Chunking by tokens with overlap, and text extraction from every supported format."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.errors import APIError
from rag.chunker import chunk_sections, embedding_text, windows
from rag.embedder import HashEmbedder
from rag.extract import Section, detect_format, extract
from tests.support.rag_corpus import CORPUS, make_pdf


@given(n=st.integers(0, 2000), size=st.integers(1, 300), overlap=st.integers(0, 299))
def test_windows_cover_every_token_within_size_and_overlap(n: int, size: int, overlap: int) -> None:
    if overlap >= size:
        with pytest.raises(ValueError):
            windows(n, size, overlap)
        return
    spans = windows(n, size, overlap)
    covered = set()
    for start, end in spans:
        assert 0 <= start < end <= n and end - start <= size
        covered.update(range(start, end))
    assert covered == set(range(n))
    for (s1, e1), (s2, _) in itertools.pairwise(spans):
        assert s2 > s1 and e1 - s2 == overlap  # consecutive windows share exactly `overlap` tokens


words = st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=8), min_size=1, max_size=400)


@settings(max_examples=60)
@given(tokens=words, size=st.integers(2, 50), data=st.data())
def test_chunks_are_verbatim_slices_keeping_the_heading_path(tokens: list[str], size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    text = " ".join(tokens)
    embedder = HashEmbedder()
    chunks = chunk_sections([Section(("A", "B"), text)], embedder.token_offsets, size, overlap)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.text in text and chunk.heading_path == ("A", "B")
        assert len(embedder.token_offsets(chunk.text)) == chunk.tokens <= size
    assert chunks[0].text.split()[0] == tokens[0] and chunks[-1].text.split()[-1] == tokens[-1]


def test_embedding_text_carries_title_and_headings() -> None:
    [chunk] = chunk_sections([Section(("Colony",), "queen and workers")], HashEmbedder().token_offsets, 10, 2)
    assert embedding_text("Honey Bees", chunk) == "Honey Bees > Colony\nqueen and workers"


def test_markdown_headings_become_paths_and_code_fences_are_not_headings() -> None:
    text = "# Guide\nintro\n## Install\n```\n# not a heading\n```\n### Linux\napt\n## Use\nrun it\n"
    doc = extract(text.encode(), "markdown", "fallback")
    assert doc.title == "Guide"
    assert [s.heading_path for s in doc.sections] == [
        ("Guide",),
        ("Guide", "Install"),
        ("Guide", "Install", "Linux"),
        ("Guide", "Use"),
    ]
    assert "# not a heading" in doc.sections[1].text


def test_html_drops_script_and_style_and_keeps_heading_paths() -> None:
    doc = extract((CORPUS / "volcanoes.html").read_bytes(), "html", "fallback")
    text = " ".join(s.text for s in doc.sections)
    assert doc.title == "Volcanoes: How They Erupt"
    assert "trackingPixel" not in text and "console.log" not in text and "font-family" not in text
    assert ("Volcanoes", "Eruptions", "Explosive eruptions") in [s.heading_path for s in doc.sections]


def test_pdf_pages_are_extracted() -> None:
    doc = extract(make_pdf(["Alpha beta gamma."], title="Greek"), "pdf", "fallback")
    assert doc.title == "Greek" and doc.sections[0].heading_path == ("page 1",)
    assert "Alpha beta gamma." in doc.sections[0].text


@pytest.mark.parametrize(
    ("data", "fmt", "code"),
    [
        (b"", "text", "empty_document"),
        (b"<html><script>x()</script></html>", "html", "empty_document"),
        (b"\xff\xfe\x00a", "text", "unreadable_document"),
        (b"not a pdf", "pdf", "unreadable_document"),
    ],
)
def test_empty_or_unreadable_documents_are_400_with_a_reason(data: bytes, fmt: str, code: str) -> None:
    with pytest.raises(APIError) as caught:
        extract(data, fmt, "x")
    assert caught.value.status == 400 and caught.value.code == code


def test_format_detection() -> None:
    assert detect_format("a.MD", None) == "markdown"
    assert detect_format("page.htm", "application/octet-stream") == "html"
    assert detect_format("blob", "application/pdf") == "pdf"
    for name, mime in (("a.docx", "text/plain"), ("blob", "image/png"), (None, None)):
        with pytest.raises(APIError) as caught:
            detect_format(name, mime)
        assert caught.value.status == 415
