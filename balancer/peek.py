"""What the proxy reads from a request before forwarding it: the caller, the model, and the request's cost.

The body is peeked at with msgspec, never re-encoded: the worker gets the client's bytes and validates
them itself. Only the fields routing and fair scheduling need are decoded (``messages`` as raw bytes for
the prefix hashes); a body whose other fields have odd types is routed on ``model`` and ``stream`` alone.
"""

from __future__ import annotations

import msgspec
from multidict import CIMultiDictProxy

from appliance.core.errors import bad_request
from appliance.core.hop import KEY_ID_HEADER, PRIORITY_HEADER, WEIGHT_HEADER
from appliance.core.request_id import is_sane
from appliance.core.wire import prompt_count
from balancer.fairqueue import ANONYMOUS, BATCH, INTERACTIVE, PRIORITIES, Caller, Demand
from balancer.pool import WorkerPool
from balancer.prefix import prefix_chain, prompt_blocks

__all__ = ["caller_of", "peek_body"]

_MAX_WEIGHT = 1000.0
_MAX_CHOICES = 256  # a worker's most slots: the worker refuses more, the estimate ignores it
_MAX_PROMPTS = 4096  # a worker's most max_prompts: the same


class _Target(msgspec.Struct):
    model: str = ""
    stream: bool = False


class _Routed(msgspec.Struct):
    """What routing and scheduling read from a body (the worker validates the rest)."""

    model: str = ""
    stream: bool = False
    messages: list[msgspec.Raw] | None = None
    prompt: msgspec.Raw = msgspec.Raw()  # empty: none (msgspec cannot decode Raw | None: a string failed it)
    max_tokens: int | float | str | None = None
    max_completion_tokens: int | float | str | None = None
    n: int | float | str | None = None


_decode_target = msgspec.json.Decoder(_Target).decode
_decode_routed = msgspec.json.Decoder(_Routed).decode


def caller_of(headers: CIMultiDictProxy[str]) -> Caller:
    """Who is asking, from the gateway's hop headers (trusted behind the internal token)."""
    key_id = headers.get(KEY_ID_HEADER)
    priority = headers.get(PRIORITY_HEADER)
    if key_id is None and priority is None:
        return ANONYMOUS
    if key_id is None or not is_sane(key_id):
        key_id = ""
    weight = 1.0
    raw = headers.get(WEIGHT_HEADER)
    if raw:
        try:
            weight = float(raw)
        except ValueError:
            weight = 1.0
        if not 0 < weight <= _MAX_WEIGHT:  # also rejects nan
            weight = 1.0
    return Caller(key_id, BATCH if priority == PRIORITIES[BATCH] else INTERACTIVE, weight)


def peek_body(body: bytes, demand: Demand, pool: WorkerPool) -> tuple[str, bool]:
    """The model and stream flag of a request; fills in ``demand`` (cost, token estimate, prefix route).

    A body without a model goes to the one model served, if there is exactly one."""
    parts: list[bytes] = []
    if body:
        try:
            routed = _decode_routed(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            routed = None  # odd field types: the worker answers those; route on model and stream alone
        if routed is not None:
            model, stream = routed.model, routed.stream
            parts = _describe(demand, body, routed, prefix_routing=pool.prefix_routing)
        else:
            try:
                target = _decode_target(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
            model, stream = target.model, target.stream
            demand.prompt_tokens = len(body) / 4
    else:
        model, stream = "", False
    if not model:
        served = pool.models()
        if len(served) != 1:
            raise bad_request("The request must name a model.", param="model", code="missing_model")
        model = served[0]
    if parts:
        demand.route = prefix_chain(demand.caller.key_id, model, parts)
    return model, stream


def _describe(demand: Demand, body: bytes, routed: _Routed, *, prefix_routing: bool) -> list[bytes]:
    """Cost and token estimate (about 4 bytes a token); the parts of the prompt for prefix routing.

    The body is the one source of a request's cost: its sequences are prompts x ``n``, counted by the rule
    the gateway and the worker apply (:func:`appliance.core.wire.prompt_count`); values the worker will
    refuse count as one."""
    demand.prompt_tokens = len(body) / 4
    n = routed.n
    choices = n if isinstance(n, int) and type(n) is not bool and 1 < n <= _MAX_CHOICES else 1
    prompts = _prompts(routed.prompt)
    demand.slots = choices * (prompts if prompts <= _MAX_PROMPTS else 1)
    limit = routed.max_completion_tokens if routed.max_completion_tokens is not None else routed.max_tokens
    if isinstance(limit, int | float) and type(limit) is not bool and limit >= 0:
        demand.max_tokens = int(limit)  # per sequence: the fair queue charges it for every one
    if not prefix_routing:
        return []
    if routed.messages:
        return [bytes(message) for message in routed.messages]
    if routed.prompt:
        return list(prompt_blocks(bytes(routed.prompt)))
    return []


def _prompts(raw: msgspec.Raw) -> int:
    """Prompts in a completions ``prompt`` (one unless it is a JSON list: only then is it decoded)."""
    view = memoryview(raw)
    if not view or view[0] != 0x5B:  # "["
        return 1
    try:
        return prompt_count(msgspec.json.decode(view))
    except (msgspec.DecodeError, RecursionError):
        return 1
