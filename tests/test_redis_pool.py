"""The router's Redis pool (router/redis_pool.py) closes every connection it made, even one that left its
lists, and makes no new one after shutdown: against a real Redis."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from router.redis_pool import ClosingPool, close_redis, make_redis


async def test_close_redis_disconnects_a_connection_the_pool_lost_track_of_and_refuses_new_ones(
        redis_url: str) -> None:
    client = make_redis(redis_url, 1.0)
    pool = client.connection_pool
    assert isinstance(pool, ClosingPool)
    assert await client.ping()
    stray = await pool.get_connection()          # checked out, then dropped from the pool's lists
    pool._in_use_connections.discard(stray)      # as a late task's hand-back would leave it
    assert stray.is_connected
    await close_redis(client)
    assert not stray.is_connected
    with pytest.raises(RedisConnectionError):    # a task still running after shutdown gets an error
        await client.ping()
