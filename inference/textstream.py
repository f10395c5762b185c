"""Token bytes to client text: whole UTF-8 characters only, stop sequences held back.

A token may end in the middle of a multi-byte character, and a stop sequence
may arrive split over several tokens. :class:`TextStream` emits only text that
can never turn out to be part of a stop sequence, so a stream's chunks joined
together equal the non-streamed answer.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

__all__ = ["TextStream", "held_suffix_length"]


def held_suffix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
    best = 0
    for stop in stops:
        upto = min(len(stop) - 1, len(text))
        for size in range(upto, best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


@dataclass(slots=True)
class TextStream:
    """Feed token bytes, get the text that is safe to send."""

    stops: tuple[str, ...] = ()
    stopped: bool = False
    _pending: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def feed(self, piece: bytes) -> str:
        """Text to emit now; sets :attr:`stopped` when a stop sequence completed."""
        if self.stopped:
            return ""
        text = self._decoder.decode(piece)
        if not text:
            return ""
        if not self.stops:
            return text
        pending = self._pending + text
        cut = -1
        for stop in self.stops:
            index = pending.find(stop)
            if index >= 0 and (cut < 0 or index < cut):
                cut = index
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return pending[:cut]
        hold = held_suffix_length(pending, self.stops)
        self._pending = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def finish(self) -> str:
        """The rest, once generation ended for another reason (end of text, length)."""
        if self.stopped:
            return ""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return rest
