"""The shared ledger in Redis: caps, single use and leases for a whole cluster.

Theory of operation
-------------------
Every node of a cluster points at the same Redis (``--redis-url``). What the
nodes must agree on lives there, each decision made by one Lua script so it
is atomic, with time taken from Redis (``TIME``), the one clock all nodes
share:

* ``ws:<workspace>``: a sorted set of that workspace's slots, member = the
  ticket's key (`tickets.ticket_key`, never the ticket), score = when the
  slot frees itself (ms). A mint adds one with the ticket's pairing deadline
  (``RESERVE`` counts the set first: that is the per-workspace cap). Pairing
  and every heartbeat set a running relay's score to now + lease (the
  pairing deadline no longer matters once paired): a transfer keeps its slot
  as long as its node lives, past the TTL if it must, and a crashed node's
  slots free themselves one lease after its last heartbeat; its end removes
  it. Entries whose score passed are trimmed before every count: a slot held
  by a ticket nobody served, or by a node that died, frees itself.
* ``pending``: the same for minted-but-unpaired tickets of all workspaces
  (the pending cap); pairing or the end removes the member.
* ``owner:<key>``: the node serving a signed ticket, with a lease (``ADMIT``
  sets it on the ticket's first arrival at a node; the heartbeat renews it).
  A second node asked for the same ticket while the lease lives answers 421.
* ``spent:<key>``: a signed ticket whose relay paired (it can never pair
  again, even if its node dies mid-transfer) or ended, kept until the
  ticket's own expiry: once no live node owns it, every node answers 410.

Decisions (`reserve`, `admit`) are awaited by the request that needs them,
bounded by ``redis_timeout_s``; if Redis cannot answer, the request gets 503
"cluster state unavailable" and nothing else changes. Records (`paired`,
`ended`) run in the background and never touch the transfer they describe.
All calls made in one loop iteration leave together as one pipeline;
an `ended` that fails is kept (bounded) and sent again with the next
heartbeat, and the node's own `LocalLedger` remembers spent tickets anyway.
Transfers already paired never wait for Redis.

This assumes one Redis (a primary, possibly with replicas or Sentinel), not
Redis Cluster: the scripts touch several keys at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..core import logsafe
from ..core.errors import ClusterUnavailable, MintDisabled, WorkspaceCapReached
from .ledger import TOO_MANY_PENDING, Admission, Holding

log = logging.getLogger("fastrelay")

PREFIX = "fastrelay:"

MAX_UNSENT_ENDS = 100_000
"""`ended` records kept for a retry while Redis is away; past this the
oldest are dropped (their slots still free themselves at their deadline)."""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A workspace set expires with its last slot, so idle workspaces leave nothing.
_KEEP_SET = """
local function keep_set(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIREAT', key, math.floor(tonumber(top[2])) + 1000) end
end
"""

# KEYS: ws, pending. ARGV: member, expires_ms, max_per_workspace, max_pending.
RESERVE = (
    _NOW
    + _KEEP_SET
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 'cap' end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 'pending' end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
keep_set(KEYS[1])
return 'ok'
"""
)

# KEYS: spent, owner. ARGV: node, lease_ms.
# A live owner elsewhere comes first: a side that reached the wrong node
# while its relay runs (or waits) there hears 421, not 410. Once that owner
# is gone, a ticket marked spent (ended, or paired by a node that died) is 410.
ADMIT = """
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return 'elsewhere' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'spent' end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 'ok'
"""

# KEYS: ws, pending, spent. ARGV: member, lease_ms, single_use (1/0), expires_ms.
# A single-use ticket is spent the moment it pairs, not only when its relay
# ends: if its node dies mid-transfer, the end is never recorded, and once
# the node's owner lease lapsed another node would serve the ticket afresh.
# The mark lives until the ticket's own expiry (after which it is 410 anyway).
PAIRED = (
    _NOW
    + _KEEP_SET
    + """
if ARGV[3] == '1' and tonumber(ARGV[4]) > now then
  redis.call('SET', KEYS[3], '1', 'PXAT', ARGV[4])
end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  keep_set(KEYS[1])
end
return 'ok'
"""
)

# KEYS: ws, pending, spent, owner. ARGV: member, expires_ms, node, signed (1/0).
ENDED = (
    _NOW
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[4] == '1' then
  if tonumber(ARGV[2]) > now then redis.call('SET', KEYS[3], '1', 'PXAT', ARGV[2]) end
  if redis.call('GET', KEYS[4]) == ARGV[3] then redis.call('DEL', KEYS[4]) end
end
return 'ok'
"""
)

# KEYS: ws, owner. ARGV: member, node, lease_ms, paired (1/0), signed (1/0).
REFRESH = (
    _NOW
    + _KEEP_SET
    + """
if ARGV[4] == '1' then
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[3]), ARGV[1]) == 1 then
    keep_set(KEYS[1])
  end
end
if ARGV[5] == '1' then
  local owner = redis.call('GET', KEYS[2])
  if owner == ARGV[2] then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  elseif not owner then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  end
end
return 'ok'
"""
)


class RedisLedger:
    """`ledger.SharedLedger` on redis-py's asyncio client.

    Every script call goes through `_call`, which queues it; once per loop
    iteration the queue leaves as one pipeline on one connection. Measured
    here: ~140 us of CPU for one standalone redis-py call, ~30-50 us each in
    a pipeline of 8-32, so under load (many relays minting, arriving and
    ending at once) the shared ledger costs a fraction of a round trip each.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        max_per_workspace: int,
        max_pending: int,
        lease_s: float,
        timeout_s: float,
        max_connections: int = 16,
    ) -> None:
        self.node_id = node_id
        self.max_per_workspace = max_per_workspace
        self.max_pending = max_pending
        self.lease_ms = round(lease_s * 1000)
        self.timeout_s = timeout_s
        # No retries inside redis-py: a request waits at most timeout_s, and
        # background records are retried by the heartbeat instead. A burst
        # waits for one of max_connections (pipelines in flight at once)
        # rather than failing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._reserve = self.client.register_script(RESERVE)
        self._admit = self.client.register_script(ADMIT)
        self._paired = self.client.register_script(PAIRED)
        self._ended = self.client.register_script(ENDED)
        self._refresh = self.client.register_script(REFRESH)
        self._scripts = (self._reserve, self._admit, self._paired, self._ended, self._refresh)
        self._queue: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]] = []
        self._flush_soon = False
        self._background: set[asyncio.Task[Any]] = set()
        self._unsent_ends: dict[str, tuple[str, int, bool]] = {}
        self._refreshing = False
        self.up = True
        """False from a failed Redis call until the next one that succeeds."""
        self.errors = 0
        """Redis calls that failed (timeouts, refused connections, errors)."""

    @property
    def refresh_interval_s(self) -> float:
        return self.lease_ms / 3000

    # --- decisions (awaited by a request) ----------------------------------------

    async def reserve(self, key: str, workspace_id: str, expires_ms: int) -> None:
        verdict = await self._decide(
            self._reserve,
            [_ws(workspace_id), PREFIX + "pending"],
            [key, expires_ms, self.max_per_workspace, self.max_pending],
        )
        if verdict == b"cap":
            raise WorkspaceCapReached()
        if verdict == b"pending":
            raise MintDisabled(TOO_MANY_PENDING)

    async def admit(self, key: str) -> Admission:
        verdict = await self._decide(
            self._admit,
            [PREFIX + "spent:" + key, PREFIX + "owner:" + key],
            [self.node_id, self.lease_ms],
        )
        if verdict == b"spent":
            return Admission.SPENT
        if verdict == b"elsewhere":
            return Admission.ELSEWHERE
        return Admission.OK

    async def _decide(self, script: Any, keys: list[str], args: list[Any]) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                verdict = await self._call(script, keys, args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise ClusterUnavailable() from None
        self._succeeded()
        return bytes(verdict)

    # --- records (background) ------------------------------------------------------

    def paired(self, key: str, workspace_id: str, expires_ms: int, single_use: bool) -> None:
        keys = [_ws(workspace_id), PREFIX + "pending", PREFIX + "spent:" + key]
        args = [key, self.lease_ms, 1 if single_use else 0, expires_ms]
        self._record(self._call(self._paired, keys, args))

    def ended(self, key: str, workspace_id: str, expires_ms: int, signed: bool) -> None:
        record = (workspace_id, expires_ms, signed)
        self._record(
            self._call(self._ended, *self._end_call(key, record)),
            on_error=lambda: self._keep_end(key, record),
        )

    def _record(
        self, future: asyncio.Future[Any], on_error: Callable[[], None] | None = None
    ) -> None:
        """Count the outcome of a background call; nobody awaits it."""

        def done(f: asyncio.Future[Any]) -> None:
            exc = None if f.cancelled() else f.exception()
            if exc is None:
                self._succeeded()
                return
            self._failed(exc)
            if on_error is not None:
                on_error()

        future.add_done_callback(done)

    def _end_call(self, key: str, record: tuple[str, int, bool]) -> tuple[list[str], list[Any]]:
        workspace_id, expires_ms, signed = record
        keys = [
            _ws(workspace_id),
            PREFIX + "pending",
            PREFIX + "spent:" + key,
            PREFIX + "owner:" + key,
        ]
        return keys, [key, expires_ms, self.node_id, 1 if signed else 0]

    def _keep_end(self, key: str, record: tuple[str, int, bool]) -> None:
        unsent = self._unsent_ends
        if len(unsent) >= MAX_UNSENT_ENDS:
            del unsent[next(iter(unsent))]
        unsent[key] = record

    def refresh(self, holdings: list[Holding]) -> None:
        """Heartbeat: the ends Redis missed, then every lease and running slot."""
        if self._refreshing:
            return  # the last heartbeat is still out: Redis is slow or away
        unsent, self._unsent_ends = self._unsent_ends, {}
        for key, (workspace_id, expires_ms, signed) in unsent.items():
            self.ended(key, workspace_id, expires_ms, signed)  # kept again if it fails
        beats = [
            self._call(
                self._refresh,
                [_ws(h.workspace_id), PREFIX + "owner:" + h.key],
                [h.key, self.node_id, self.lease_ms, int(h.paired), int(h.signed)],
            )
            for h in holdings
        ]
        if not beats:
            return
        self._refreshing = True
        # One pipeline carries them all: its outcome is counted once.
        for beat in beats[:-1]:
            beat.add_done_callback(_retrieve)
        self._record(beats[-1])
        beats[-1].add_done_callback(self._refreshed)

    def _refreshed(self, _: asyncio.Future[Any]) -> None:
        self._refreshing = False

    # --- one pipeline per loop iteration -------------------------------------------

    def _call(self, script: Any, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one script call; its future resolves when its pipeline returns."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_soon = False
        batch, self._queue = self._queue, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            # Bounded even if a connection hangs: one heartbeat interval.
            async with asyncio.timeout(self.refresh_interval_s):
                results = await self._evalsha(batch)
                if any(isinstance(r, NoScriptError) for r in results):
                    # Redis lost its script cache (restarted): load, send again.
                    for script in self._scripts:
                        await self.client.script_load(script.script)
                    results = await self._evalsha(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for *_, future in batch:
                future.cancel()
            raise
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its waiter gave up (timeout) or went away
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _evalsha(
        self, batch: list[tuple[Any, list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        """Run the batch by script digest: one round trip (redis-py's own
        script pipelines first ask SCRIPT EXISTS, a second one each time)."""
        if len(batch) == 1:  # alone: a plain call costs less than a pipeline
            script, keys, args, _ = batch[0]
            try:
                return [await self.client.evalsha(script.sha, len(keys), *keys, *args)]
            except ResponseError as exc:  # the script's own error (or NOSCRIPT), not the link's
                return [exc]
        async with self.client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    # --- health ------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.up:
            self.up = False
            log.error(
                "cluster state (Redis) unavailable: %s: %s; mints and first arrivals get 503 "
                "until it answers again",
                type(exc).__name__,
                logsafe.safe(exc),
            )

    def _succeeded(self) -> None:
        if not self.up:
            self.up = True
            log.warning("cluster state (Redis) reachable again")

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"<RedisLedger node={self.node_id} up={self.up}>"


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (its batch's outcome is counted elsewhere)."""
    if not future.cancelled():
        future.exception()


def _ws(workspace_id: str) -> str:
    return PREFIX + "ws:" + workspace_id
