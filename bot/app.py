"""Everything one Parley process shares, built once from Settings and closed once."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from aiohttp import web
from limits.aio.storage import RedisClusterStorage, RedisStorage
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.driver_info import DriverInfo

from bot.conversation import Conversation
from bot.embedded_redis import EmbeddedRedis
from bot.metrics import Metrics
from bot.ratelimit import EditBudgets, Limiter
from bot.router import Router
from bot.settings import Settings, redis_nodes
from bot.state import RedisClient, State

log = logging.getLogger(__name__)


def _driver_info() -> DriverInfo:
    """What each Redis connection tells the server it is (CLIENT SETINFO), computed once.

    redis-py otherwise reads its own version from the installed metadata for every new connection
    (about 1 ms of CPU each: 6% of Parley's CPU in a burst of 300 turns, docs/benchmarks.md §4).
    """
    try:
        version = importlib.metadata.version("parley")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return DriverInfo().add_upstream_driver("parley", version)


DRIVER_INFO = _driver_info()


def _credentials(url: str) -> dict[str, Any]:
    """The URL's username and password (URL-quoted there), as redis-py's keyword arguments."""
    parts = urlsplit(url)
    found: dict[str, Any] = {"password": unquote(parts.password)} if parts.password else {}
    if parts.username:
        found["username"] = unquote(parts.username)
    return found


def is_cluster(url: str) -> bool:
    return urlsplit(url).scheme in ("redis+cluster", "rediss+cluster")


def connect_redis(url: str, *, max_connections: int = 200) -> RedisClient:
    """One pool per process, from a redis://, rediss://, unix://, redis+sentinel:// or
    redis+cluster:// URL.

    Sentinel: `redis+sentinel://[:password@]host:port[,host:port…]/service[/db]`; the client
    follows the master through failovers. Cluster: `redis+cluster://[:password@]host:port[,…]`
    (any reachable nodes; the client learns the rest and follows slot moves and failovers).
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 30,
        "socket_connect_timeout": 5,
        "retry_on_timeout": True,
        "driver_info": DRIVER_INFO,
    }
    parts = urlsplit(url)
    auth = _credentials(url)
    if is_cluster(url):
        del options["health_check_interval"], options["retry_on_timeout"]  # not cluster options
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in redis_nodes(url, 6379)],
            ssl=parts.scheme.startswith("rediss"),
            max_connections=max_connections,  # per node
            **auth,
            **options,
        )
    if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        nodes = redis_nodes(url, 26379)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a sentinel URL names the service: redis+sentinel://host:port/name")
        db = int(path[1]) if len(path) > 1 else 0
        if parts.scheme.startswith("rediss"):
            options["ssl"] = True
        sentinel = aioredis.Sentinel(nodes, sentinel_kwargs=dict(auth), **auth)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(path[0], db=db, **options)
        return master
    # Blocking: a burst of turns past the pool's size waits for a connection instead of failing
    # at once (redis-py's default pool raises "Too many connections").
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, **options
    )
    return aioredis.Redis(connection_pool=pool)


async def check_redis(settings: Settings) -> str:
    """Reach the configured Redis (the embedded one, started and stopped for it, when none is
    configured) and say which it is: every host, never the password. Raises if it cannot."""
    embedded = None
    try:
        if settings.redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir / "redis")
            url = await embedded.start()
            where = f"embedded, data in {settings.data_dir / 'redis'}"
        else:
            url = settings.redis_url.get_secret_value()
            parts = urlsplit(url)  # Sentinel and Cluster URLs list several hosts
            where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        client = connect_redis(url)
        try:
            await client.ping()
            if isinstance(client, RedisCluster):
                where += f", a cluster of {len(client.get_primaries())} primaries"
        finally:
            await client.aclose()
        return where
    finally:
        if embedded is not None:
            await embedded.stop()


def rate_storage(url: str, prefix: str, max_connections: int) -> RedisStorage | None:
    """The `limits` storage for a cluster (it keeps its own cluster client); None otherwise
    (the Limiter then shares our client's pool)."""
    if not is_cluster(url):
        return None
    parts = urlsplit(url)
    scheme = "async+redis+cluster"
    netloc = ",".join(f"{host}:{port}" for host, port in redis_nodes(url, 6379))
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_connect_timeout": 5,
        "driver_info": DRIVER_INFO,
        **_credentials(url),
    }
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    return RedisClusterStorage(
        f"{scheme}://{netloc}",
        implementation="redispy",
        key_prefix=Limiter.storage_prefix(prefix),
        **options,
    )


@dataclass
class Parley:
    settings: Settings
    redis: RedisClient
    state: State
    limiter: Limiter
    router: Router
    conversation: Conversation
    http: web.Application
    metrics: Metrics
    embedded: EmbeddedRedis | None = None
    _listener: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: Settings) -> Parley:
        embedded = None
        if settings.redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir / "redis")
            url = await embedded.start()
            log.info(
                "no PARLEY_REDIS_URL: started an embedded Redis, data in %s",
                (settings.data_dir / "redis").resolve(),
            )
        else:
            url = settings.redis_url.get_secret_value()
        redis = connect_redis(url, max_connections=settings.redis_max_connections)
        state = State(
            redis,
            prefix=settings.redis_prefix,
            history_max=settings.history_max_messages,
            history_ttl=settings.history_ttl_days * 86400,
            dedup_ttl=settings.dedup_ttl,
            thread_images=settings.thread_images,
            thread_image_bytes=settings.thread_image_bytes,
        )
        limiter = Limiter(
            redis,
            rate=settings.rate_limit,
            max_in_flight=settings.max_in_flight,
            in_flight_ttl=settings.turn_timeout,
            prefix=settings.redis_prefix,
            storage=rate_storage(url, settings.redis_prefix, settings.redis_max_connections),
        )
        router = Router.from_settings(settings)
        router.share_caps(redis, settings.redis_prefix)
        metrics = Metrics()
        conversation = Conversation(
            settings=settings,
            state=state,
            limiter=limiter,
            router=router,
            budgets=EditBudgets(redis, prefix=settings.redis_prefix),
            metrics=metrics,
        )
        parley = cls(
            settings,
            redis,
            state,
            limiter,
            router,
            conversation,
            web.Application(),
            metrics,
            embedded,
        )
        parley._listener = asyncio.create_task(conversation.listen_for_stops())
        return parley

    async def aclose(self) -> None:
        await self.conversation.summaries.aclose()
        if self.conversation.tools is not None:
            await self.conversation.tools.aclose()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=2.0)  # never hang a shutdown on it
        await self.router.aclose()
        await self.limiter.aclose()
        await self.redis.aclose()
        if self.embedded is not None:
            await self.embedded.stop()
