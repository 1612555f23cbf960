"""The simulator's HTTP face: vLLM's OpenAI-compatible API over aiohttp.

Routes: POST /v1/chat/completions, POST /v1/completions (streaming and not, with
`stream_options.include_usage`), GET /v1/models, GET /health, GET /ping,
POST /tokenize, POST /detokenize, GET /metrics, POST /reset_prefix_cache,
GET|POST /admin/faults, GET /admin/seen, GET /version; `--api-key` guards them as vLLM does
(backends/sim/auth.py). Errors use vLLM's (OpenAI-style) shape.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from backends.sim import validation
from backends.sim.auth import ApiKeys
from backends.sim.engine import Engine, SimRequest
from backends.sim.faults import Faults
from backends.sim.kv_publisher import KVEventPublisher
from backends.sim.metrics import EngineMetrics
from backends.sim.profile import SimProfile
from backends.tokenization import TierTokenizer

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()
_WORD = re.compile(r"^ [a-z]{2,9}$")
SIM_VERSION = "0.11.0+tiergate-sim"


def error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError",
            503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, body=_json.encode(body), content_type="application/json",
                        headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Parsed:
    prompt_ids: list[int]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool
    ignore_eos: bool
    seed: int | None


class SimServer:
    def __init__(self, profile: SimProfile, tokenizer: TierTokenizer, *, served_model_name: str | None = None,
                 num_gpu_blocks: int | None = None, time_scale: float = 1.0, faults: Faults | None = None,
                 enable_prefix_caching: bool = True, instance_id: str = "sim",
                 api_keys: Sequence[str] = ()) -> None:
        self.profile = profile
        self.tok = tokenizer
        self.model = served_model_name or profile.model
        self.instance_id = instance_id
        self.faults = faults or Faults()
        self.rng = random.Random(0xFA17)
        self.started = time.monotonic()
        words = sorted(i for i in range(min(tokenizer.vocab_size, 60000))
                       if _WORD.match(tokenizer.id_to_token_text(i) or ""))[:2000]
        self.text_of = {i: tokenizer.id_to_token_text(i) for i in words}
        self.engine = Engine(profile, num_gpu_blocks=num_gpu_blocks, time_scale=time_scale,
                             output_vocab=words, enable_prefix_caching=enable_prefix_caching)
        self.engine.slow_factor = self._slow_factor
        self.metrics = EngineMetrics(self.engine, self.model)
        self.kv_publisher: KVEventPublisher | None = None
        self.auth = ApiKeys(api_keys)   # vLLM's --api-key (backends/sim/auth.py)

    def publish_kv_events(self, publisher: KVEventPublisher) -> None:
        self.kv_publisher = publisher
        self.engine.kv.listener = publisher.add

    def _slow_factor(self) -> float:
        f = self.faults
        if f.slow_start_s <= 0:
            return 1.0
        age = time.monotonic() - self.started
        if age >= f.slow_start_s:
            return 1.0
        return 1.0 + (f.slow_start_factor - 1.0) * (1.0 - age / f.slow_start_s)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self.auth.middleware])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_get("/admin/faults", self.get_faults)
        app.router.add_post("/admin/faults", self.set_faults)
        app.router.add_get("/admin/seen", self.auth.seen_page)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.engine.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()
        if self.kv_publisher is not None:
            self.kv_publisher.close()

    # --- small endpoints --------------------------------------------------------
    async def health(self, _r: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, _r: web.Request) -> web.Response:
        return web.json_response({"version": SIM_VERSION})

    async def models(self, _r: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": int(self.started), "owned_by": "vllm",
                "root": self.profile.model, "parent": None, "max_model_len": self.profile.max_model_len,
                "permission": []}
        return web.Response(body=_json.encode({"object": "list", "data": [card]}),
                            content_type="application/json")

    async def metrics_page(self, _r: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def reset_prefix_cache(self, _r: web.Request) -> web.Response:
        self.engine.kv.reset()
        return web.Response(status=200)

    async def get_faults(self, _r: web.Request) -> web.Response:
        return web.Response(body=_json.encode(self.faults), content_type="application/json")

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            faults = msgspec.json.decode(await request.read(), type=Faults)
            faults.validate()
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            return error(400, str(exc))
        self.faults = faults
        if faults.slow_start_s > 0:
            self.started = time.monotonic()
        return web.Response(body=_json.encode(faults), content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = self._body(await request.read())
            if "messages" in body:
                text = self._render(body)
                ids = await self.tok.encode(text)
            elif isinstance(body.get("prompt"), str):
                ids = await self.tok.encode(body["prompt"], add_special_tokens=bool(
                    body.get("add_special_tokens", True)))
            else:
                raise BadRequest("either 'prompt' or 'messages' is required", "prompt")
        except BadRequest as exc:
            return error(400, str(exc), exc.param)
        out = {"count": len(ids), "max_model_len": self.profile.max_model_len, "tokens": ids,
               "token_strs": None}
        return web.Response(body=_json.encode(out), content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = self._body(await request.read())
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise BadRequest("'tokens' must be a list of integers", "tokens")
            bad = [i for i in ids if not 0 <= i < self.tok.vocab_size + 1000]
            if bad:
                raise BadRequest(f"token id {bad[0]} out of vocabulary range", "tokens")
        except BadRequest as exc:
            return error(400, str(exc), exc.param)
        return web.json_response({"prompt": self.tok.decode(ids)})

    # --- parsing ------------------------------------------------------------------
    def _body(self, raw: bytes) -> dict[str, Any]:
        try:
            body = _decode.decode(raw)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"Invalid JSON body: {exc}") from None
        except RecursionError:
            raise BadRequest("Invalid JSON body: nested too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _render(self, body: dict[str, Any]) -> str:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise BadRequest("'messages' must be a non-empty list of message objects", "messages")
        norm = []
        for m in msgs:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            norm.append({**m, "content": content if content is not None else ""})
        extra = body.get("chat_template_kwargs")
        try:
            return self.tok.render_chat(norm, tools=body.get("tools"),
                                        add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                                        extra=extra if isinstance(extra, dict) else None)
        except Exception as exc:
            raise BadRequest(f"chat template error: {exc}", "messages") from None

    async def _parse(self, raw: bytes, chat: bool) -> Parsed:
        body = self._body(raw)
        try:  # what vLLM's pydantic request model and SamplingParams refuse (backends/sim/validation.py)
            validation.sampling(body)
            if chat:
                validation.messages(body.get("messages"))
                validation.tools(body)
        except validation.Invalid as exc:
            raise BadRequest(str(exc), exc.param) from None
        model = body.get("model")
        if model != self.model:
            raise LookupError(f"The model `{model}` does not exist.")
        if chat:
            ids = await self.tok.encode(self._render(body))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
                ids = list(prompt)
            elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                ids = await self.tok.encode(prompt[0])
            elif isinstance(prompt, str):
                ids = await self.tok.encode(prompt)
            else:
                raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
            try:
                validation.prompt_ids(ids, self.tok.vocab_size)
            except validation.Invalid as exc:
                raise BadRequest(str(exc), exc.param) from None
        max_tokens = body.get("max_completion_tokens")   # vLLM: max_completion_tokens, else max_tokens; null is unset
        max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        if body.get("n", 1) != 1:
            raise BadRequest("the simulator serves n=1 only", "n")
        n = len(ids)
        mml = self.profile.max_model_len
        if max_tokens is not None and n + max_tokens > mml:
            raise BadRequest(
                f"This model's maximum context length is {mml} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.", "max_tokens")
        if n >= mml:
            raise BadRequest(
                f"This model's maximum context length is {mml} tokens. However, your request has {n} "
                "input tokens. Please reduce the length of the input messages.", "messages")
        if n + (max_tokens or 1) > self.engine.kv.num_blocks * self.profile.block_size:
            raise BadRequest(f"request needs more KV cache than this instance has ({n} prompt tokens)")
        so = body.get("stream_options")
        seed = body.get("seed")
        return Parsed(prompt_ids=ids, max_tokens=max_tokens, stream=bool(body.get("stream", False)),
                      include_usage=bool(isinstance(so, dict) and so.get("include_usage")),
                      continuous_usage=bool(isinstance(so, dict) and so.get("include_usage")
                                            and so.get("continuous_usage_stats")),
                      ignore_eos=bool(body.get("ignore_eos", False)),
                      seed=seed if isinstance(seed, int) else None)

    # --- generation ---------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        f = self.faults
        if f.hang_before_headers_s > 0:
            await asyncio.sleep(f.hang_before_headers_s)
        injected = f.draw(self.rng)
        if injected is not None:
            ra = f.retry_after_s if injected in (429, 503) else None
            return error(injected, f"injected fault: HTTP {injected}", retry_after=ra)
        raw = await request.read()
        if f.poisoned(raw):
            return error(500, "injected fault: this input fails (query of death)")
        try:
            p = await self._parse(raw, chat)
        except BadRequest as exc:
            return error(400, str(exc), exc.param)
        except LookupError as exc:
            return error(404, str(exc), "model")
        seed = p.seed if p.seed is not None else hash(tuple(p.prompt_ids))
        rng = random.Random(seed)
        target, capped = self.engine.target_length(rng, len(p.prompt_ids), p.max_tokens, p.ignore_eos)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req = SimRequest(request_id=rid, prompt_ids=p.prompt_ids, target_len=target, length_capped=capped,
                         rng=rng)
        self.engine.add(req)
        try:
            if p.stream:
                return await self._stream(request, req, chat, p.include_usage, p.continuous_usage)
            return await self._complete(req, chat)
        finally:
            if req.finish_reason is None:
                self.engine.abort(req)

    def _usage(self, req: SimRequest, completion: int | None = None) -> dict[str, Any]:
        n = len(req.prompt_ids)
        c = len(req.output_ids) if completion is None else completion
        return {"prompt_tokens": n, "total_tokens": n + c, "completion_tokens": c,
                "prompt_tokens_details": {"cached_tokens": max(req.cached_tokens, 0)}}

    async def _complete(self, req: SimRequest, chat: bool) -> web.Response:
        while req.finish_reason is None:
            req.event.clear()
            await req.event.wait()
        text = "".join(self.text_of.get(t, "") for t in req.output_ids)
        created = int(time.time())
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text,
                                      "reasoning_content": None, "tool_calls": []}, "logprobs": None,
                                      "finish_reason": req.finish_reason, "stop_reason": None}
            body = {"id": req.request_id, "object": "chat.completion", "created": created,
                    "model": self.model, "choices": [choice], "usage": self._usage(req),
                    "prompt_logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason,
                      "stop_reason": None, "prompt_logprobs": None}
            body = {"id": req.request_id, "object": "text_completion", "created": created,
                    "model": self.model, "choices": [choice], "usage": self._usage(req)}
        raw = _json.encode(body)
        self.engine.stats.delivered_tokens += len(req.output_ids)
        if self.faults.malformed == "json":
            raw = raw[: len(raw) // 2]
        return web.Response(body=raw, content_type="application/json")

    async def _stream(self, request: web.Request, req: SimRequest, chat: bool,
                      include_usage: bool, continuous_usage: bool = False) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if hang := self.faults.hang_after_headers_s:
            await asyncio.sleep(hang)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = f'data: {{"id":"{req.request_id}","object":"{obj}","created":{created},"model":"{self.model}",'
        f = self.faults
        chunks = 0
        sent = 0

        async def emit(piece: str, tokens: int = 0) -> None:
            nonlocal chunks
            if stall := f.stall_before(chunks):
                await asyncio.sleep(stall)
            await resp.write(piece.encode())
            self.engine.stats.delivered_tokens += tokens
            chunks += 1
            if f.cut_after_chunks and chunks >= f.cut_after_chunks and request.transport is not None:
                request.transport.close()
                raise ConnectionResetError("injected cut")

        if chat:
            await emit(head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                       '"logprobs":null,"finish_reason":null}]}\n\n')
        while True:
            done = req.finish_reason is not None
            if not done and sent == len(req.output_ids):
                req.event.clear()
                await req.event.wait()
                continue
            new = req.output_ids[sent:]
            sent += len(new)
            if new or done:
                text = _json.encode("".join(self.text_of.get(t, "") for t in new)).decode()
                reason = f'"{req.finish_reason}"' if done else "null"
                # vLLM's continuous_usage_stats: every chunk carries the usage so far
                tail = ',"usage":' + _json.encode(self._usage(req, sent)).decode() if continuous_usage else ""
                if f.malformed == "sse" and chunks >= 1:
                    await emit('data: {"id": broken\n\n')
                elif chat:
                    await emit(head + f'"choices":[{{"index":0,"delta":{{"content":{text}}},"logprobs":null,'
                               f'"finish_reason":{reason}}}]{tail}}}\n\n', len(new))
                else:
                    await emit(head + f'"choices":[{{"index":0,"text":{text},"logprobs":null,'
                               f'"finish_reason":{reason},"stop_reason":null}}]{tail}}}\n\n', len(new))
            if done:
                break
        if include_usage:
            await emit(head + '"choices":[],"usage":' + _json.encode(self._usage(req)).decode() + "}\n\n")
        await emit("data: [DONE]\n\n")
        await resp.write_eof()
        return resp
