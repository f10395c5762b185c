"""Token logprobs travel with the text they make up, even when stop sequences hold text back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from inference.logprobs import TokenLogprob
from inference.sequence import ActiveSequence, GenerationRequest, SequenceHandle
from inference.textstream import TextStream


def _run(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], list[list[str]], bool]:
    """Drive the decode thread's bookkeeping: (text sent per step, tokens released per step, stopped)."""
    handle = SequenceHandle(GenerationRequest(prompt_tokens=[1], max_tokens=100, logprobs=0), sampler=None)
    seq = ActiveSequence(handle, 0, TextStream(stops))
    sent: list[str] = []
    released: list[list[str]] = []
    for index, piece in enumerate(pieces):
        raw = piece.encode()
        seq.held_logprobs.append((seq.token_bytes, TokenLogprob(raw, -1.0)))
        seq.token_bytes += len(raw)
        text = seq.stream.feed(raw)
        final = seq.stream.stopped or index == len(pieces) - 1
        if final and not seq.stream.stopped:
            text += seq.stream.finish()
        sent.append(text)
        released.append([item.text for item in seq.release_logprobs(text, final=final)])
        if final:
            break
    return sent, released, seq.stream.stopped


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(["a", "b", "\n", "Us", "er", ":", " x", "é", "\nUser:"]), min_size=1,
                       max_size=30),
       stop=st.sampled_from(["\nUser:", "b\n", "zz"]))
def test_released_tokens_cover_the_sent_text(pieces: list[str], stop: str) -> None:
    sent, released, stopped = _run(pieces, (stop,))
    for step in range(len(sent) - 1):  # before the end: only tokens whose text has wholly gone out
        so_far = "".join(token for tokens in released[: step + 1] for token in tokens)
        assert "".join(sent[: step + 1]).startswith(so_far)
    tokens = [token for step_tokens in released for token in step_tokens]
    joined, text = "".join(tokens), "".join(sent)
    assert tokens == pieces[: len(tokens)]  # in order, none twice, none skipped
    assert joined.startswith(text)  # every sent character has its token
    assert not tokens or len(joined) - len(text) < len(tokens[-1])  # only a token a stop cut reaches past it
    if not stopped:
        assert joined == text == "".join(pieces)
