"""Turn uploaded bytes (plain text, Markdown, PDF, HTML) into titled sections with heading paths."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import PurePath

from appliance.core.errors import bad_request, unsupported_media_type
from appliance.core.rag_wire import format_of

__all__ = ["ParsedDocument", "Section", "detect_format", "extract"]


@dataclass(frozen=True)
class Section:
    heading_path: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class ParsedDocument:
    title: str
    format: str
    sections: list[Section] = field(default_factory=list)

    @property
    def text_length(self) -> int:
        return sum(len(s.text.strip()) for s in self.sections)


def detect_format(filename: str | None, content_type: str | None) -> str:
    """The format from the file name, else the part's media type; 415 when neither is known."""
    fmt = format_of(filename, content_type)
    if fmt is not None:
        return fmt
    shown = PurePath(filename or "").suffix.lower() or (content_type or "").split(";")[0].strip().lower() or "unknown"
    raise unsupported_media_type(f"Unsupported document type {shown!r}; upload .txt, .md, .pdf or .html files.")


def extract(data: bytes, fmt: str, fallback_title: str) -> ParsedDocument:
    """Parse ``data``; an empty or unreadable document is a 400 with the reason."""
    if fmt == "pdf":
        parsed = _pdf(data, fallback_title)
    else:
        text = _decode(data)
        if fmt == "markdown":
            parsed = _markdown(text, fallback_title)
        elif fmt == "html":
            parsed = _html(text, fallback_title)
        else:
            parsed = ParsedDocument(fallback_title, "text", [Section((), text)])
    if parsed.text_length == 0:
        raise bad_request("The document contains no text.", code="empty_document")
    return parsed


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise bad_request("The document is not text (it contains NUL bytes).", code="unreadable_document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"The document is not valid UTF-8 ({exc.reason} at byte {exc.start}).", code="unreadable_document"
        ) from None


_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _markdown(text: str, fallback_title: str) -> ParsedDocument:
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    lines: list[str] = []
    title = ""
    in_fence = False

    def flush() -> None:
        if "".join(lines).strip():
            sections.append(Section(tuple(h for _, h in path), "\n".join(lines)))
        lines.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        match = None if in_fence else _MD_HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        flush()
        level, heading = len(match.group(1)), match.group(2).strip()
        title = title or (heading if level == 1 else "")
        path = [(lvl, h) for lvl, h in path if lvl < level] + [(level, heading)]
    flush()
    return ParsedDocument(title or fallback_title, "markdown", sections)


class _HTMLSections(HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "section", "article", "blockquote", "pre", "table", "ul", "ol", "dd", "dt", "hr"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self.title = ""
        self._path: list[tuple[int, str]] = []
        self._parts: list[str] = []
        self._heading: list[str] | None = None
        self._heading_level = 0
        self._skip_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self._SKIP:
            self._skip_depth += 1
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._flush()
            self._heading, self._heading_level = [], int(tag[1])
        elif tag in self._BLOCK:
            self._parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif self._heading is not None and tag == f"h{self._heading_level}":
            heading = " ".join("".join(self._heading).split())
            level = self._heading_level
            self._heading = None
            if heading:
                self._path = [(lvl, h) for lvl, h in self._path if lvl < level] + [(level, heading)]
        elif tag in self._BLOCK:
            self._parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._skip_depth:
            return
        elif self._heading is not None:
            self._heading.append(data)
        else:
            self._parts.append(data)

    def _flush(self) -> None:
        text = re.sub(r"[ \t]+", " ", "".join(self._parts))
        text = re.sub(r"\n\s*\n+", "\n\n", text).strip()
        if text:
            self.sections.append(Section(tuple(h for _, h in self._path), text))
        self._parts.clear()

    def finish(self) -> None:
        self.close()
        self._flush()


def _html(text: str, fallback_title: str) -> ParsedDocument:
    parser = _HTMLSections()
    parser.feed(text)
    parser.finish()
    first_heading = next((s.heading_path[0] for s in parser.sections if s.heading_path), "")
    title = " ".join(parser.title.split()) or first_heading or fallback_title
    return ParsedDocument(title, "html", parser.sections)


def _pdf(data: bytes, fallback_title: str) -> ParsedDocument:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise bad_request("The PDF is encrypted.", code="unreadable_document")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise bad_request(
            f"The PDF cannot be read ({type(exc).__name__}: {exc}).", code="unreadable_document"
        ) from None
    sections = [Section((f"page {n}",), text) for n, text in enumerate(pages, 1) if text.strip()]
    return ParsedDocument(str(meta_title).strip() or fallback_title, "pdf", sections)
