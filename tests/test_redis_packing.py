"""router/redis_pool.py packs commands with hiredis: the bytes equal redis-py's own packing, and a client
made by `make_redis` round-trips every kind of argument the stores send through a real Redis."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from router.redis_pool import PackedConnection, close_redis, make_redis


def test_hiredis_packing_equals_redis_pys() -> None:
    conn = PackedConnection()
    plain = aioredis.Connection()
    for args in [("SET", "k", "v"), ("EVALSHA", b"\x00\xffsha", 2, "a", "b", 7, -3, 0.25, 1e-7, "x" * 70000),
                 ("HSET", "h", "f", b""), ("CONFIG GET", "maxmemory")]:
        assert b"".join(conn.pack_command(*args)) == b"".join(plain.pack_command(*args)), args


async def test_a_made_client_round_trips_through_redis(redis_url: str) -> None:
    client = make_redis(redis_url, 0.05)
    assert isinstance(client.connection_pool.connection_class(), PackedConnection)
    key = "pack-" + uuid.uuid4().hex
    try:
        assert await client.set(key, "x" * 70000)
        assert await client.get(key) == b"x" * 70000
        script = client.register_script("return {ARGV[1], ARGV[2], ARGV[3]}")
        assert await script(keys=[key], args=[7, 0.25, b"\x00\xff"]) == [b"7", b"0.25", b"\x00\xff"]
    finally:
        await client.delete(key)
        await close_redis(client)
