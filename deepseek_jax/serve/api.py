"""The OpenAI-compatible HTTP API over an Engine (FastAPI): /v1/models, /v1/completions, /v1/chat/completions
(with `stream: true` as server-sent events ending in `data: [DONE]`), /health and Prometheus /metrics.

Text is handled here, tokens in the engine: a request's ids stream back through a StreamDecoder, and a stop
string ends the request (the engine frees its slot) with the text cut before it, as OpenAI does. Every error is
OpenAI's JSON, {"error": {"message", "type", "param", "code"}}, and leaves the server serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict

from deepseek_jax.data import DataError, StreamDecoder, encode_prompt
from deepseek_jax.serve.engine import Engine, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server ignores (user, logit_bias, ...)

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class CompletionRequest(_Common):
    prompt: str | list[int]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None


class TextStream:
    """Token ids in, text deltas out: EOS is no text, and a stop string ends the text just before it (the
    characters that could still begin one are held back)."""

    def __init__(self, tokenizer: Any, stop: list[str], eos_id: int | None):
        self.decoder, self.stop, self.eos_id = StreamDecoder(tokenizer), [s for s in stop if s], eos_id
        self.held, self.text = "", ""
        self.hold = max(map(len, self.stop), default=1) - 1

    def push(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """(new text, whether a stop string ended it)."""
        self.held += self.decoder.push([i for i in ids if i != self.eos_id])
        if final:
            self.held += self.decoder.flush()
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.held = self.held[:min(hits)], ""
            self.text += out
            return out, True
        cut = len(self.held) if final else max(len(self.held) - self.hold, 0)
        out, self.held = self.held[:cut], self.held[cut:]
        self.text += out
        return out, False


class _EngineStats:
    """The engine's own counts as Prometheus metrics, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e, pages = self.engine, self.engine.pages
        for name, doc, value in (("requests_waiting", "requests queued for a slot or pages", len(e.waiting)),
                                 ("requests_running", "requests holding a decode slot", len(e.running)),
                                 ("cache_pages_used", "latent-cache pages held by sequences", pages.used),
                                 ("cache_pages_total", "latent-cache pages in the pool", pages.num_pages),
                                 ("cache_usage_ratio", "share of the pages held", pages.used / pages.num_pages)):
            yield GaugeMetricFamily(f"deepseek_{name}", doc, value=value)
        for name, doc, value in (("prefix_cache_queries", "full prompt pages looked up", pages.queries),
                                 ("prefix_cache_hits", "full prompt pages found in the prefix cache", pages.hits),
                                 ("preemptions", "running requests recomputed for want of pages", e.preemptions),
                                 ("engine_steps", "engine iterations", e.steps),
                                 ("spec_decode_draft_tokens", "MTP drafts verified", e.drafted),
                                 ("spec_decode_accepted_tokens", "MTP drafts accepted", e.accepted)):
            yield CounterMetricFamily(f"deepseek_{name}", doc, value=value)
        if e.depth:
            yield GaugeMetricFamily("deepseek_spec_decode_acceptance_rate", "accepted / verified MTP drafts",
                                    value=e.accepted / max(e.drafted, 1))


def create_app(engine: Engine, tokenizer: Any, model_name: str, *, run_engine: bool = True) -> FastAPI:
    """The app; with run_engine its lifespan runs engine.serve_forever in a thread and stops it on shutdown."""
    registry = prom.CollectorRegistry()
    registry.register(_EngineStats(engine))
    ttft = prom.Histogram("deepseek_time_to_first_token_seconds", "arrival to first token", registry=registry,
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    tpot = prom.Histogram("deepseek_time_per_output_token_seconds", "mean time between a request's tokens",
                          registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
    finished = prom.Counter("deepseek_requests", "finished requests", ["finish_reason"], registry=registry)
    prompt_tokens = prom.Counter("deepseek_prompt_tokens", "prompt tokens", registry=registry)
    output_tokens = prom.Counter("deepseek_generation_tokens", "generated tokens", registry=registry)
    eos_id = tokenizer.eos_id if tokenizer.eos_id >= 0 else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=engine.serve_forever, name="engine", daemon=True) if run_engine else None
        if thread:
            thread.start()
        yield
        if thread:
            engine.stop()
            thread.join()
            engine.cancel_all()  # no request is left hanging

    app = FastAPI(title="deepseek-jax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError):
        errors = e.errors()
        where = ".".join(str(x) for x in errors[0]["loc"][1:]) if errors else None
        message = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in errors)
        return JSONResponse(APIError(400, f"malformed request: {message}", param=where or None).body, 400)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "deepseek-jax", "max_model_len": engine.max_len}]}

    def settle(body: _Common, ids: list[int], max_tokens: int | None) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request (n=1)", param="n")
        if len(ids) >= engine.max_len:
            raise APIError(400, f"the prompt is {len(ids)} tokens, but this model's context is {engine.max_len} "
                           f"tokens (prompt and output); shorten the prompt", param="prompt",
                           code="context_length_exceeded")
        try:
            return SamplingParams(body.temperature, body.top_p, body.top_k, 16 if max_tokens is None else max_tokens,
                                  body.seed)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split("=")[0]) from None

    async def run(ids: list[int], params: SamplingParams, stop: str | list[str] | None
                  ) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish_reason or None, tokens generated so far) as the engine produces them; cancels the
        request if the consumer goes away (a client disconnect)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        text = TextStream(tokenizer, [stop] if isinstance(stop, str) else list(stop or []), eos_id)
        request = engine.submit(ids, params, lambda new, reason: loop.call_soon_threadsafe(
            events.put_nowait, (new, reason)))
        prompt_tokens.inc(len(ids))
        reason = None
        try:
            while reason is None:
                new, reason = await events.get()
                delta, hit = text.push(new, final=reason is not None)
                if hit:
                    engine.cancel(request, "stop")
                    reason = "stop"
                if delta or reason:
                    yield delta, reason, len(request.output)
        finally:
            if not request.done:  # a client gone, a stop string: the engine frees the slot and pages
                engine.cancel(request)
            finished.labels(reason or "cancelled").inc()
            output_tokens.inc(len(request.output))
            if request.first_token_time is not None:
                ttft.observe(request.first_token_time - request.arrival)
                if len(request.output) > 1:
                    tpot.observe((time.perf_counter() - request.first_token_time) / (len(request.output) - 1))

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(body: _Common, ids: list[int], max_tokens: int | None, chat: bool):
        params = settle(body, ids, max_tokens)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}

        def choice(delta: str, reason: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            content = {"role": "assistant", "content": delta}
            return {"index": 0, ("delta" if stream else "message"): content, "logprobs": None, "finish_reason": reason}

        if not body.stream:
            parts = [part async for part in run(ids, params, body.stop)]  # the last one has the finish_reason
            return {**head, "object": "chat.completion" if chat else "text_completion",
                    "choices": [choice("".join(p[0] for p in parts), parts[-1][1], False)],
                    "usage": usage(len(ids), parts[-1][2])}

        kind = "chat.completion.chunk" if chat else "text_completion"
        with_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            count = 0
            async for delta, reason, generated in run(ids, params, body.stop):
                chunk = {**head, "object": kind, "choices": [choice(delta, reason, True)]}
                if with_usage:
                    chunk["usage"] = None
                count = generated
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            if with_usage:
                last = {**head, "object": kind, "choices": [], "usage": usage(len(ids), count)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def encoded(prompt: str | list[dict]) -> list[int]:
        try:
            ids = encode_prompt(tokenizer, prompt)
        except DataError as e:
            raise APIError(400, str(e), param="messages" if not isinstance(prompt, str) else "prompt") from None
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = body.prompt if isinstance(body.prompt, list) else encoded(body.prompt)
        if not ids or min(ids) < 0 or max(ids) >= engine.cfg.vocab_size:
            raise APIError(400, f"a prompt of token ids needs at least one, each in [0, {engine.cfg.vocab_size})",
                           param="prompt")
        return await respond(body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        if not body.messages:
            raise APIError(400, "messages is empty: give at least one message", param="messages")
        ids = encoded([m.model_dump(exclude_none=True) for m in body.messages])
        return await respond(body, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    return app
