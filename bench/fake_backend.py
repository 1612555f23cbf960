"""A loopback fake vLLM that answers at once (for measuring router overhead only).

Raw asyncio protocol, keep-alive, TCP_NODELAY. Non-streaming requests get a fixed
chat completion; `"stream": true` requests get 4 SSE chunks, a usage chunk and [DONE]
in one chunked response. GET /health answers 200.

With `--shaped` (bench/peers.py), a request whose body holds `peers-stream n=N gap=G` streams instead
vLLM-shaped SSE: a role chunk and the first content chunk at once, the other N-1 content chunks G ms
apart (G=0: all of them in one write, back to back), the last with finish_reason, then a usage chunk
and [DONE], each event its own HTTP chunk; and POST .../render (vLLM's render endpoint, which vllm-router
calls before each request) gets a fixed list of prompt token ids. Other requests get the answers above,
unchanged.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys

COMPLETION = (b'{"id":"chatcmpl-x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"hi there"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,'
              b'"prompt_tokens_details":{"cached_tokens":0}}}')
EVENTS = [b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d"},'
          b'"finish_reason":null}]}\n\n' % i for i in range(4)]
USAGE = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,'
         b'"completion_tokens":4,"total_tokens":13}}\n\ndata: [DONE]\n\n')


SHAPED = False  # --shaped: honour `peers-stream n=N gap=G` in a request body
SHAPE = re.compile(rb"peers-stream n=(\d+) gap=(\d+(?:\.\d+)?)")
VLLM_HEAD = b'data: {"id":"chatcmpl-peers","object":"chat.completion.chunk","created":1733000000,"model":"m","choices":'
VLLM_ROLE = VLLM_HEAD + (b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                         b'"finish_reason":null}]}\n\n')
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


# vLLM's POST /v1/chat/completions/render (the prompt's token ids; vllm-router asks it before each request)
RENDER = (b'{"request_id":"render-peers","token_ids":[151644,872,198,7985,264,6386,38242,911,59175,13,151645,198,'
          b'151644,77091,198],"features":null,"sampling_params":{"max_tokens":16},"model":"m","stream":false}')


def vllm_event(i: int, last: bool) -> bytes:
    finish = b'"length","stop_reason":null' if last else b"null"
    return VLLM_HEAD + b'[{"index":0,"delta":{"content":"tok%d "},"logprobs":null,"finish_reason":%s}]}\n\n' % (
        i, finish)


def vllm_usage(n: int) -> bytes:
    return VLLM_HEAD + (b'[],"usage":{"prompt_tokens":9,"total_tokens":%d,"completion_tokens":%d}}\n\n'
                        b"data: [DONE]\n\n" % (9 + n, n))


def chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b)


class Paced:
    """Writes one shaped stream's events on the loop's clock: event i at start + i x gap."""

    def __init__(self, t: asyncio.Transport, n: int, gap_s: float) -> None:
        self.t, self.n, self.gap, self.i = t, n, gap_s, 1
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        t.write(SSE_HEAD + chunk(VLLM_ROLE) + chunk(vllm_event(0, n == 1)) + (b"" if n > 1 else self.tail()))
        if n > 1:
            self.loop.call_at(self.start + gap_s, self.step)

    def tail(self) -> bytes:
        return chunk(vllm_usage(self.n)) + b"0\r\n\r\n"

    def step(self) -> None:
        if self.t.is_closing():
            return
        i, last = self.i, self.i == self.n - 1
        self.t.write(chunk(vllm_event(i, last)) + (self.tail() if last else b""))
        self.i += 1
        if not last:
            self.loop.call_at(self.start + self.i * self.gap, self.step)


class Proto(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4:total]
            self.buf = self.buf[total:]
            self.respond(head, body)

    def respond(self, head: str, body: bytes) -> None:
        shape = SHAPE.search(body) if SHAPED and not head.startswith("GET") else None
        if SHAPED and head.startswith("POST") and head.split(" ", 2)[1].endswith("/render"):
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "  # type: ignore[attr-defined]
                         + str(len(RENDER)).encode() + b"\r\n\r\n" + RENDER)
        elif shape is not None:
            n, gap_ms = max(1, int(shape[1])), float(shape[2])
            if gap_ms > 0:
                Paced(self.t, n, gap_ms / 1000)  # type: ignore[arg-type]
            else:
                out = (chunk(VLLM_ROLE) + b"".join(chunk(vllm_event(i, i == n - 1)) for i in range(n))
                       + chunk(vllm_usage(n)) + b"0\r\n\r\n")
                self.t.write(SSE_HEAD + out)  # type: ignore[attr-defined]
        elif head.startswith("GET"):
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # type: ignore[attr-defined]
        elif b'"stream":true' in body or b'"stream": true' in body:
            out = b"".join(chunk(e) for e in EVENTS) + chunk(USAGE) + b"0\r\n\r\n"
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"  # type: ignore[attr-defined]
                         b"transfer-encoding: chunked\r\n\r\n" + out)
        else:
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "  # type: ignore[attr-defined]
                         + str(len(COMPLETION)).encode() + b"\r\n\r\n" + COMPLETION)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Proto, "127.0.0.1", port, backlog=1024)
    print(f"fake backend on {port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    SHAPED = "--shaped" in sys.argv[2:]
    uvloop.run(main(int(sys.argv[1])))
