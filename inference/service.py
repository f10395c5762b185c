"""The worker's domain layer: model lifecycle, request validation, admission, and the answer to send.

The HTTP handlers parse a body and write what :meth:`WorkerService.chat` or
:meth:`WorkerService.complete` returns (inference.answers); everything in
between is here. Work that takes milliseconds (schema to grammar, grammar
compilation, Jinja rendering and tokenisation of long prompts) runs off the
event loop, and a repeated schema reuses its compiled grammar.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from appliance.core.errors import APIError, bad_request, not_found, overloaded
from appliance.core.priority import Priority
from appliance.core.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelLimits,
    check_max_tokens,
    check_n,
    check_prompts,
    model_list,
    model_object,
    reject_unsupported,
)
from appliance.core.worker_health import WorkerHealth
from inference.answers import Answer, Streamed, Whole, stream, usage, whole
from inference.cachekeeper import PromptCacheKeeper
from inference.diskcache import CacheReport
from inference.lanes import LanePolicy
from inference.metrics import WorkerMetrics
from inference.model import LoadedModel, load_model
from inference.prefix import Scope
from inference.replies import ChatReply, CompletionReply, Emitter, chat_response, completion_body, new_id
from inference.sampling import SamplingParams, compile_grammar
from inference.scheduler import Event, QueueFull, Scheduler, SpeculationSettings
from inference.sequence import GenerationRequest, SequenceHandle
from inference.settings import WorkerSettings
from inference.structured import LAZY_TRIGGER, StructuredPlan, plan_structured
from inference.templates import ChatTemplate, RenderedPrompt

__all__ = ["ModelLoader", "WorkerService", "choices"]

log = logging.getLogger(__name__)

ModelLoader = Callable[[WorkerSettings], LoadedModel]
# Rendering and tokenizing a long prompt takes milliseconds: do it off the event loop past this size.
TOKENIZE_INLINE_CHARS = 4096
SETTLE_POLL_S = 0.05
# Structured-output plans (schema -> GBNF) remembered per distinct tools/response_format.
PLAN_CACHE_SIZE = 64


class WorkerService:
    """``settings`` are the worker's; a swap host replaces ``self.settings`` with those of each catalogue entry it
    loads (its file, alias, slots and n_ctx). ``keeper`` keeps a model's prompt cache across unloads and restarts."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics, loader: ModelLoader = load_model,
                 keeper: PromptCacheKeeper | None = None) -> None:
        self.base = settings
        self.settings = settings
        self.metrics = metrics
        self.alias = settings.initial_model if settings.swap_host else settings.model_alias
        self.state = "loading"  # "ok", "loading", "failed", or "empty" (a swap host holding no model)
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self.in_flight = 0  # generation requests between their handler's start and their answer's end
        self._loader = loader
        self._keeper = keeper
        self.model: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self.template = ChatTemplate(None)
        self._plans: OrderedDict[str, StructuredPlan] = OrderedDict()

    # -- lifecycle --

    async def load(self) -> None:
        """The worker's own model at start (not a swap host's: inference.swap loads those)."""
        try:
            await self.open(self.settings)
        except Exception as exc:
            self.state, self.failure = "failed", str(exc)
            log.error("model load failed: %s", exc)
            self.failed.set()

    async def open(self, settings: WorkerSettings) -> CacheReport:
        """Load the model ``settings`` name, read back its saved prompt cache, start decoding; what was restored.

        Raises what the loader raises (the state is then the caller's to set)."""
        self.state, self.alias, self.settings, self.failure = "loading", settings.model_alias, settings, None
        model = await asyncio.to_thread(self._loader, settings)
        try:
            saved = await asyncio.to_thread(self._keeper.read, model, settings) if self._keeper else None
        except BaseException:
            await asyncio.to_thread(model.close)
            raise
        self.model = model
        source = settings.template_source() or model.metadata("tokenizer.chat_template")
        self.template = ChatTemplate(source, bos_token=model.bos_text(), eos_token=model.eos_text())
        self._plans.clear()
        self.metrics.serve(self.alias)
        self.scheduler = Scheduler(model, queue_size=settings.queue_size, prefill_chunk=settings.prefill_chunk,
                                   reuse=settings.prefix_reuse, share_across_keys=settings.prefix_share_across_keys,
                                   count_prompt=self.metrics.count_prompt,
                                   host_cache_bytes=settings.prompt_cache_bytes,
                                   speculation=SpeculationSettings(settings.speculative, settings.draft_max,
                                                                   settings.draft_probe_every),
                                   count_draft=self.metrics.count_draft,
                                   lanes=LanePolicy(settings.batch_lane_busy, settings.batch_lane_grace_s),
                                   count_lane=self.metrics.lanes)
        report = CacheReport()
        if saved is not None:  # before the decode thread starts: the context is this thread's
            report = await asyncio.to_thread(PromptCacheKeeper.refill, self.scheduler, saved)
        self.scheduler.start(asyncio.get_running_loop(), self._on_step)
        self.metrics.slots_total.set(settings.slots)
        self.metrics.prompt_cache_restored_prefixes.labels(self.alias).inc(report.prefixes)
        self.metrics.prompt_cache_restored_tokens.labels(self.alias).inc(report.tokens)
        self.state = "ok"
        log.info("model ready", extra={"model": self.alias, "fallback_template": self.template.is_fallback,
                                       "gpu_layers": model.gpu_layers, "threads": model.shape.threads,
                                       "decode": model.decode_mode.describe(), "restored_prefixes": report.prefixes,
                                       "restored_tokens": report.tokens})
        return report

    def idle(self) -> bool:
        """No generation request is being handled and no sequence runs or waits."""
        scheduler = self.scheduler
        return self.in_flight == 0 and (scheduler is None or scheduler.slots_busy + scheduler.queue_depth == 0)

    async def settle(self) -> bool:
        """Whether the worker is :meth:`idle`, after waiting up to ``settle_s`` for sequences whose clients left
        (the decode thread frees them at its next step); False at once while a request is being handled."""
        deadline = time.monotonic() + self.base.settle_s
        while not self.idle():
            if self.in_flight or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL_S)
        return True

    async def unload(self) -> CacheReport:
        """Free the model (only when :meth:`idle`): its slots' cells and host-RAM prefixes go to disk first."""
        self.state = "loading"
        report = await asyncio.to_thread(self._close, True)
        self.state, self.alias = "empty", ""
        return report

    def close(self) -> None:
        """On the worker's way out (blocking): the prompt cache is saved when ``prompt_cache_save_on_stop``."""
        self._close(self.base.prompt_cache_save_on_stop)

    def _close(self, keep_cache: bool) -> CacheReport:
        scheduler, model = self.scheduler, self.model
        self.scheduler = self.model = None
        report = CacheReport()
        if scheduler is not None and model is not None and keep_cache and self._keeper is not None:
            report = self._keeper.keep_and_stop(model, scheduler)
            self.metrics.prompt_cache_saved_prefixes.labels(self.alias).inc(report.prefixes)
            log.info("prompt cache saved", extra={"model": self.alias, "prefixes": report.prefixes,
                                                  "tokens": report.tokens, "bytes": report.bytes})
        elif scheduler is not None:
            scheduler.stop()
        if model is not None:
            model.close()
        return report

    def health(self) -> tuple[int, WorkerHealth]:
        """What ``GET /health`` publishes (:class:`~appliance.core.worker_health.WorkerHealth`) and its status."""
        swap = self.base.swap_host
        memory = self.base.memory_bytes or None
        if self.state != "ok" or self.model is None or self.scheduler is None:
            state = self.state if self.state != "ok" else "loading"
            return 503, WorkerHealth(status=state, model=self.alias, error=self.failure or None,
                                     swap_host=swap or None, loading=(state == "loading") if swap else None,
                                     memory_bytes=memory)
        limits = self.limits()
        prompt_tokens, reused = self.metrics.prompt_totals()
        return 200, WorkerHealth(
            status="ok", model=self.alias, slots_total=self.scheduler.slots_total,
            slots_busy=self.scheduler.slots_busy, queue_depth=self.scheduler.queue_depth,
            queue_limit=self.settings.queue_size, model_sha256=self.model.sha256,
            n_ctx=self.settings.n_ctx, gpu_layers=self.model.gpu_layers,
            decode=self.model.decode_mode.describe(),
            context_length=limits.context_length, max_tokens=limits.max_tokens,
            max_choices=limits.max_choices, max_prompts=limits.max_prompts,
            prompt_tokens=prompt_tokens, prompt_tokens_reused=reused,
            swap_host=swap or None, loading=False if swap else None, memory_bytes=memory,
        )

    def _on_step(self, events: list[Event], batch_size: int, busy: int, waiting: int) -> None:
        """Runs on the event loop once per decode step."""
        now = time.perf_counter()
        metrics = self.metrics
        if batch_size:
            metrics.batch_size.observe(batch_size)
        metrics.slots_busy.set(busy)
        metrics.queue_depth.set(waiting)
        generated = 0
        for handle, text, new_tokens, finish_reason, error, logprobs in events:
            if new_tokens:
                generated += new_tokens
                if handle.last_token_at is None:
                    metrics.ttft.observe(now - handle.submitted_at)
                else:
                    metrics.inter_token.observe(now - handle.last_token_at)
                handle.last_token_at = now
            handle.push(text, new_tokens, finish_reason, error, logprobs)
        if generated:
            metrics.generated_tokens.inc(generated)

    # -- models --

    def limits(self) -> ModelLimits:
        """The worker's limits: the truth the balancer, the gateway and the chat UI read from /v1/models."""
        settings = self.settings
        return ModelLimits(context_length=settings.n_ctx, max_tokens=settings.max_tokens_cap,
                           max_choices=settings.slots, max_prompts=settings.max_prompts)

    def models(self) -> dict[str, Any]:
        served = [self.alias] if self.alias else []  # a swap host may hold none
        return model_list(served, limits={alias: self.limits() for alias in served})

    def model_card(self, name: str) -> dict[str, Any]:
        self.check_model(name)
        return model_object(self.alias, self.limits())

    # -- requests --

    def ready(self) -> tuple[LoadedModel, Scheduler]:
        if self.state == "empty":
            raise APIError(503, "This worker holds no model yet.", type_="server_error", code="loading",
                           retry_after=2)
        if self.state != "ok" or self.model is None or self.scheduler is None:
            raise APIError(503, f"The model {self.alias!r} is still loading." if self.alias else
                           "The model is still loading.", type_="server_error", code="loading", retry_after=2)
        return self.model, self.scheduler

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around one generation request, its answer included: refused (503) while no model is ready, and counted
        in :attr:`in_flight` so a swap never frees the model under it."""
        self.ready()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def check_model(self, name: str) -> None:
        if name != self.alias and self.base.swap_host:  # another model may be back here soon: not a 404
            raise APIError(503, f"This worker serves {self.alias!r} now, not {name!r}.", type_="server_error",
                           code="model_not_loaded", retry_after=1)
        if name != self.alias:
            raise not_found(f"The model {name!r} does not exist on this worker (it serves {self.alias!r}).",
                            param="model", code="model_not_found")

    async def chat(self, body: ChatCompletionRequest, scope: Scope = None,
                   priority: Priority = Priority.INTERACTIVE) -> Answer:
        """A chat answer with ``n`` choices: one prompt, prefilled once, its cells shared by every choice."""
        reject_unsupported(body)
        self.check_model(body.model)
        check_n(body, self.settings.slots)
        top_logprobs = _chat_top_logprobs(body)
        plan = await self._plan(body)
        tokens, template_stops = await self.chat_prompt(body, plan)
        lazy = plan.grammar is None and plan.lazy_grammar is not None
        generation = self.generation(
            body, tokens, template_stops, ignore_eos=body.ignore_eos,
            grammar=plan.lazy_grammar if lazy else plan.grammar, grammar_trigger=LAZY_TRIGGER if lazy else None,
            logprobs=top_logprobs, scope=scope, priority=priority,
        )
        handles = await self.submit_all(self._shared(choices(generation, body.n)))
        first = ChatReply(new_id("chatcmpl"), self.alias, int(time.time()), plan, top_logprobs is not None)
        replies = [dataclasses.replace(first, index=i) for i in range(len(handles))]
        if not body.stream:
            results = await whole(handles)
            body_choices = [reply.choice(text, logprobs, handle.finish_reason or "stop")
                            for reply, handle, (text, logprobs) in zip(replies, handles, results, strict=True)]
            return Whole(chat_response(id_=first.id_, model=self.alias, created=first.created, choices=body_choices,
                                       usage=usage(handles, body.n)))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_chunk = {**first.chunk({}), "choices": []} if include_usage else None
        pairs = [(handle, reply.emitter()) for handle, reply in zip(handles, replies, strict=True)]
        return Streamed(stream(pairs, usage_chunk, body.n), tuple(handles))

    async def complete(self, body: CompletionRequest, scope: Scope = None,
                       priority: Priority = Priority.INTERACTIVE) -> Answer:
        """A text completion: ``n`` choices per prompt (choice ``prompt_index * n + i``), all decoded together."""
        reject_unsupported(body)
        self.check_model(body.model)
        check_n(body, self.settings.slots)
        check_prompts(body, self.settings.max_prompts)
        if body.echo:
            raise bad_request("echo is not supported.", param="echo")
        prompts = await self.completion_prompts(body)
        generations = [choice for tokens in prompts
                       for choice in self._shared(choices(self.generation(body, tokens, ignore_eos=body.ignore_eos,
                                                                          logprobs=body.logprobs, scope=scope,
                                                                          priority=priority),
                                                          body.n))]
        handles = await self.submit_all(generations)
        id_, created, wants_logprobs = new_id("cmpl"), int(time.time()), body.logprobs is not None
        replies = [CompletionReply(id_, self.alias, created, wants_logprobs, index=i) for i in range(len(handles))]
        if not body.stream:
            results = await whole(handles)
            body_choices = [reply.choice(text, logprobs, handle.finish_reason or "stop")
                            for reply, handle, (text, logprobs) in zip(replies, handles, results, strict=True)]
            return Whole(completion_body(id_=id_, model=self.alias, created=created, choices=body_choices,
                                         usage=usage(handles, body.n)))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        usage_chunk = completion_body(id_=id_, model=self.alias, created=created, choices=[]) if include_usage else None
        pairs: list[tuple[SequenceHandle, Emitter]] = list(zip(handles, replies, strict=True))
        return Streamed(stream(pairs, usage_chunk, body.n), tuple(handles))

    @staticmethod
    def _shared(requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """The choices of one prompt form a group: with prefix reuse off they still share its prefill (with reuse
        on, the scheduler shares it within the caller's scope like any prompts arriving together)."""
        if len(requests) < 2:
            return requests
        group = uuid.uuid4().hex
        return [dataclasses.replace(request, group=group) for request in requests]

    async def _plan(self, body: ChatCompletionRequest) -> StructuredPlan:
        """The request's structured-output plan; schema to grammar runs off the loop, once per distinct schema."""
        if not body.tools and (body.response_format is None or body.response_format.type == "text"):
            return plan_structured(body)  # nothing to compile (tool_choice without tools is refused there)
        key = json.dumps(body.model_dump(mode="json", include={"tools", "tool_choice", "response_format"},
                                         by_alias=True), sort_keys=True)
        plan = self._plans.get(key)
        if plan is None:
            plan = await asyncio.to_thread(plan_structured, body)
            self._plans[key] = plan
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    async def chat_prompt(self, body: ChatCompletionRequest, plan: StructuredPlan
                          ) -> tuple[list[int], tuple[str, ...]]:
        model, _ = self.ready()
        messages = list(body.messages)
        size = sum(len(m.content) if isinstance(m.content, str) else len(str(m.content)) for m in messages)
        if size <= TOKENIZE_INLINE_CHARS and not plan.offered_tools:
            rendered = self.template.render(messages, plan.offered_tools)
            tokens = _tokenize(model, rendered)
        else:
            rendered, tokens = await asyncio.to_thread(self._render_and_tokenize, model, messages, plan)
        # A grammar decides where the answer ends; the template's stop strings would only cut it short.
        stops = () if plan.grammar is not None else rendered.stops
        return tokens, stops

    def _render_and_tokenize(self, model: LoadedModel, messages: list[Any], plan: StructuredPlan
                             ) -> tuple[RenderedPrompt, list[int]]:
        rendered = self.template.render(messages, plan.offered_tools)
        return rendered, _tokenize(model, rendered)

    async def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt (a string, a list of strings, token ids, or a list of those)."""
        model, _ = self.ready()
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[Any] = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise bad_request("The prompt is empty.", param="prompt")
        most = (self.settings.slots + self.settings.queue_size) // body.n
        if len(prompts) > most:
            raise bad_request(f"At most {most} prompts per request" + (f" with n={body.n}." if body.n > 1 else "."),
                              param="prompt")
        out: list[list[int]] = []
        for item in prompts:
            if isinstance(item, list):
                tokens = [int(t) for t in item]
                if any(t < 0 or t >= model.n_vocab for t in tokens):
                    raise bad_request(f"Token ids must be in [0, {model.n_vocab}).", param="prompt")
                out.append(tokens)
                continue
            rendered = RenderedPrompt(text=item, add_special=True, parse_special=True)
            if len(item) <= TOKENIZE_INLINE_CHARS:
                out.append(_tokenize(model, rendered))
            else:
                out.append(await asyncio.to_thread(_tokenize, model, rendered))
        return out

    def generation(self, body: ChatCompletionRequest | CompletionRequest, tokens: list[int],
                   extra_stops: tuple[str, ...] = (), *, ignore_eos: bool = False, grammar: str | None = None,
                   grammar_trigger: str | None = None, logprobs: int | None = None,
                   scope: Scope = None, priority: Priority = Priority.INTERACTIVE) -> GenerationRequest:
        """Validate limits against the context and turn the request into scheduler terms (``scope``: the
        calling key, whose cached prefixes the prompt may reuse)."""
        n_ctx, cap = self.settings.n_ctx, self.settings.max_tokens_cap
        if not tokens:
            raise bad_request("The prompt is empty.", param="prompt")
        if len(tokens) >= n_ctx:
            raise bad_request(
                f"This model's maximum context length is {n_ctx} tokens per request, but the prompt has "
                f"{len(tokens)} tokens, leaving no room for an answer. Shorten the prompt.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        check_max_tokens(body, cap)
        max_tokens = min(body.token_limit() or cap, n_ctx - len(tokens))
        stops = tuple(body.stop_list()) + tuple(s for s in extra_stops if s not in body.stop_list())
        sampling = self._sampling(body, grammar, grammar_trigger)
        return GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling, stops=stops,
                                 ignore_eos=ignore_eos and grammar is None, logprobs=logprobs, scope=scope,
                                 priority=priority)

    def _sampling(self, body: ChatCompletionRequest | CompletionRequest, grammar: str | None,
                  grammar_trigger: str | None) -> SamplingParams:
        bias: dict[int, float] = {}
        n_vocab = self.model.n_vocab if self.model is not None else 0
        for key, value in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < n_vocab:
                raise bad_request(f"logit_bias key {key!r} is not a token id of this model.", param="logit_bias")
            bias[int(key)] = -math.inf if value <= -100 else max(-100.0, min(100.0, value))
        return SamplingParams(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repeat_penalty=body.repeat_penalty, logit_bias=bias, grammar=grammar, grammar_trigger=grammar_trigger,
        )

    async def submit_all(self, requests: list[GenerationRequest]) -> list[SequenceHandle]:
        """Admit every sequence of a request, or none: a refusal cancels those already queued."""
        model, _ = self.ready()
        compiled: set[str] = set()
        for request in requests:
            grammar = request.sampling.grammar
            if grammar is not None and grammar not in compiled:  # compiled off the loop; submit clones the cached one
                compiled.add(grammar)
                try:
                    await asyncio.to_thread(compile_grammar, model.llama, model.vocab, request.sampling)
                except ValueError as exc:
                    raise bad_request(str(exc), param="response_format") from None
        handles: list[SequenceHandle] = []
        try:
            for request in requests:
                handles.append(self.submit(request))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def submit(self, request: GenerationRequest) -> SequenceHandle:
        _, scheduler = self.ready()
        try:
            handle = scheduler.submit(request)
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise overloaded("All slots are busy and the queue is full; retry shortly.", retry_after=1) from None
        except ValueError as exc:
            raise bad_request(str(exc), param="response_format") from None
        self.metrics.prompt_tokens.inc(handle.prompt_tokens)
        return handle


def choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The ``n`` sequences of one prompt, submitted together: the first prefills the prompt and the others
    take its cells (inference.prefix). With a ``seed``, choice ``i`` samples with ``seed + i``, so choices
    differ yet the same request gives the same choices; at temperature 0 they are all the greedy answer."""
    seed = request.sampling.seed
    if seed is None:
        return [request] * n  # each sequence draws its own random seed
    return [request if i == 0 else dataclasses.replace(request, sampling=dataclasses.replace(
        request.sampling, seed=seed + i)) for i in range(n)]


def _tokenize(model: LoadedModel, prompt: RenderedPrompt) -> list[int]:
    return model.tokenize(prompt.text, add_special=prompt.add_special, parse_special=prompt.parse_special)


def _chat_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs at all)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None
