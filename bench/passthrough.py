"""The Python floor for a router hop: an aiohttp server that passes every request to one upstream
with an aiohttp client, and streams the answer back as it arrives (bench/peers.py).

No parsing, no routing: the request body goes up as it came, the status and content-type come back,
and a streamed (chunked) answer is written to the client piece by piece as the upstream's bytes
arrive. One keep-alive `ClientSession` (unlimited pool), uvloop when installed; aiohttp sets
TCP_NODELAY on both sides. GET /health answers 200 without going upstream.

Usage: python bench/passthrough.py --port 9000 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


async def health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with session.request(request.method, request.app[UPSTREAM] + request.path_qs, data=body,
                               headers=headers) as up:
        ctype = up.headers.get("content-type", "application/octet-stream")
        if up.headers.get("transfer-encoding", "").lower() != "chunked":
            return web.Response(status=up.status, body=await up.read(), headers={"content-type": ctype})
        resp = web.StreamResponse(status=up.status, headers={"content-type": ctype})
        await resp.prepare(request)
        async for data in up.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp


async def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None,
                backlog=1024)


if __name__ == "__main__":
    main()
