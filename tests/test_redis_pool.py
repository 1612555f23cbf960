"""The router's Redis pool (router/redis_pool.py) closes every connection it made, even one that left its
lists, and makes no new one after shutdown: against a real Redis."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from router.redis_pool import ClosingPool, close_redis, make_redis, parse_url


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


def test_redis_url_forms() -> None:
    """One node (left to redis-py), a cluster from its startup nodes, a Sentinel service with its db."""
    assert parse_url("redis://127.0.0.1:6379/3") == ("single", [], {})
    assert parse_url("rediss://h:1/0")[0] == "single"
    kind, nodes, extra = parse_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,h3")
    assert (kind, nodes) == ("cluster", [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002), ("h3", 6379)])
    assert extra == {"username": "u", "password": "p@ss", "ssl": False}
    assert parse_url("rediss+cluster://h:7000")[2]["ssl"] is True
    kind, nodes, extra = parse_url("redis+sentinel://s1:26379,s2/mymaster/2")
    assert (kind, nodes, extra["service"], extra["db"]) == ("sentinel", [("s1", 26379), ("s2", 26379)], "mymaster", 2)
    assert parse_url("redis+sentinel://s1:26379/mymaster")[2]["db"] == 0
    for bad in ("redis+sentinel://s1:26379", "redis+cluster://h:7000/3"):
        with pytest.raises(ValueError):
            parse_url(bad)
