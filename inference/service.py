"""The worker's domain layer: model lifecycle, request validation, admission to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from appliance.core.errors import APIError, bad_request, not_found, overloaded
from appliance.core.wire import ChatCompletionRequest, CompletionRequest
from inference.metrics import WorkerMetrics
from inference.model import LoadedModel, load_model
from inference.sampling import SamplingParams
from inference.scheduler import Event, QueueFull, Scheduler
from inference.sequence import GenerationRequest, SequenceHandle
from inference.settings import WorkerSettings
from inference.structured import StructuredPlan
from inference.templates import ChatTemplate, RenderedPrompt

__all__ = ["ModelLoader", "WorkerService"]

log = logging.getLogger(__name__)

ModelLoader = Callable[[WorkerSettings], LoadedModel]
# Tokenizing a long prompt takes milliseconds: do it off the event loop past this size.
TOKENIZE_INLINE_CHARS = 4096


class WorkerService:
    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics, loader: ModelLoader = load_model) -> None:
        self.settings = settings
        self.metrics = metrics
        self.alias = settings.model_alias
        self.state = "loading"
        self.failure: str | None = None
        self.failed = asyncio.Event()
        self._loader = loader
        self.model: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self.template = ChatTemplate(None)

    # -- lifecycle --

    async def load(self) -> None:
        try:
            model = await asyncio.to_thread(self._loader, self.settings)
        except Exception as exc:
            self.state, self.failure = "failed", str(exc)
            log.error("model load failed: %s", exc)
            self.failed.set()
            return
        self.model = model
        source = self.settings.template_source() or model.metadata("tokenizer.chat_template")
        self.template = ChatTemplate(source, bos_token=model.bos_text(), eos_token=model.eos_text())
        self.scheduler = Scheduler(model, queue_size=self.settings.queue_size,
                                   prefill_chunk=self.settings.prefill_chunk)
        self.scheduler.start(asyncio.get_running_loop(), self._on_step)
        self.metrics.slots_total.set(self.settings.slots)
        self.state = "ok"
        log.info("model ready", extra={"model": self.alias, "fallback_template": self.template.is_fallback,
                                       "gpu_layers": model.gpu_layers, "threads": model.shape.threads})

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        if self.model is not None:
            self.model.close()
            self.model = None

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.state != "ok" or self.model is None or self.scheduler is None:
            body: dict[str, Any] = {"status": self.state, "model": self.alias}
            if self.failure:
                body["error"] = self.failure
            return 503, body
        return 200, {
            "status": "ok", "model": self.alias, "slots_total": self.scheduler.slots_total,
            "slots_busy": self.scheduler.slots_busy, "queue_depth": self.scheduler.queue_depth,
            "queue_limit": self.settings.queue_size, "model_sha256": self.model.sha256,
            "n_ctx": self.settings.n_ctx, "gpu_layers": self.model.gpu_layers,
        }

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

    # -- requests --

    def ready(self) -> tuple[LoadedModel, Scheduler]:
        if self.model is None or self.scheduler is None:
            raise APIError(503, "The model is still loading.", type_="server_error", code="loading", retry_after=2)
        return self.model, self.scheduler

    def check_model(self, name: str) -> None:
        if name != self.alias:
            raise not_found(f"The model {name!r} does not exist on this worker (it serves {self.alias!r}).",
                            param="model", code="model_not_found")

    async def chat_prompt(self, body: ChatCompletionRequest, plan: StructuredPlan
                          ) -> tuple[list[int], tuple[str, ...]]:
        model, _ = self.ready()
        rendered = self.template.render(list(body.messages), plan.offered_tools)
        # A grammar decides where the answer ends; the template's stop strings would only cut it short.
        stops = () if plan.grammar is not None else rendered.stops
        return await self._tokenize(model, rendered), stops

    async def completion_prompt(self, body: CompletionRequest) -> list[int]:
        model, _ = self.ready()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = [int(t) for t in prompt]
            if any(t < 0 or t >= model.n_vocab for t in tokens):
                raise bad_request(f"Token ids must be in [0, {model.n_vocab}).", param="prompt")
            return tokens
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_request("Send one prompt per request (a list of prompts is not supported).",
                                  param="prompt")
            text = str(prompt[0])
        else:
            text = prompt
        return await self._tokenize(model, RenderedPrompt(text=text, add_special=True, parse_special=True))

    @staticmethod
    async def _tokenize(model: LoadedModel, prompt: RenderedPrompt) -> list[int]:
        if len(prompt.text) <= TOKENIZE_INLINE_CHARS:
            return model.tokenize(prompt.text, add_special=prompt.add_special, parse_special=prompt.parse_special)
        return await asyncio.to_thread(
            model.tokenize, prompt.text, add_special=prompt.add_special, parse_special=prompt.parse_special,
        )

    def generation(self, body: ChatCompletionRequest | CompletionRequest, tokens: list[int],
                   extra_stops: tuple[str, ...] = (), *, ignore_eos: bool = False, grammar: str | None = None,
                   grammar_trigger: str | None = None, logprobs: int | None = None) -> GenerationRequest:
        """Validate limits against the context and turn the request into scheduler terms."""
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
        limit = body.token_limit()
        if limit is not None and limit > cap:
            raise bad_request(f"max_tokens is {limit}, above this worker's cap of {cap}.",
                              param="max_tokens", code="max_tokens_exceeded")
        max_tokens = min(limit or cap, n_ctx - len(tokens))
        stops = tuple(body.stop_list()) + tuple(s for s in extra_stops if s not in body.stop_list())
        sampling = self._sampling(body, grammar, grammar_trigger)
        return GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling, stops=stops,
                                 ignore_eos=ignore_eos and grammar is None, logprobs=logprobs)

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
