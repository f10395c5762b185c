"""Split sections into overlapping windows of model tokens, keeping the heading path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rag.extract import Section

__all__ = ["Chunk", "chunk_sections", "embedding_text", "windows"]

TokenOffsets = Callable[[str], list[tuple[int, int]]]


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    heading_path: tuple[str, ...]
    tokens: int


def windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of at most ``size`` that cover ``range(n_tokens)``, overlapping by ``overlap``."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    if n_tokens <= 0:
        return []
    stride = size - overlap
    spans = []
    start = 0
    while True:
        end = min(start + size, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            return spans
        start += stride


def chunk_sections(sections: Iterable[Section], offsets: TokenOffsets, size: int, overlap: int) -> list[Chunk]:
    """Chunks whose text is a verbatim slice of the section, ``size`` model tokens at most."""
    chunks: list[Chunk] = []
    for section in sections:
        spans = offsets(section.text)
        for start, end in windows(len(spans), size, overlap):
            text = section.text[spans[start][0] : spans[end - 1][1]].strip()
            if text:
                chunks.append(Chunk(len(chunks), text, section.heading_path, end - start))
    return chunks


def embedding_text(title: str, chunk: Chunk) -> str:
    """What is embedded: the chunk with its title and heading path, which carry much of its meaning."""
    context = " > ".join(part for part in (title, *chunk.heading_path) if part)
    return f"{context}\n{chunk.text}" if context else chunk.text
