"""A loopback fake vLLM that answers at once (for measuring router overhead only).

Raw asyncio protocol, keep-alive, TCP_NODELAY. Non-streaming requests get a fixed
chat completion; `"stream": true` requests get 4 SSE chunks, a usage chunk and [DONE]
in one chunked response. GET /health answers 200.
"""

from __future__ import annotations

import asyncio
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


def chunk(b: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(b), b)


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
        if head.startswith("GET"):
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

    uvloop.run(main(int(sys.argv[1])))
