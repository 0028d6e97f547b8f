"""Several relay nodes on one Redis: :class:`RedisRegistry`, the registry whose names are leases in Redis.

Every name a node holds is a **lease** in Redis (key names: README, "Cluster"): which node holds it, for which
token (its digest), of what kind, under which epoch, with a TTL the node's heartbeat renews. Leases are taken by
one Lua script, so two nodes racing for a name can't both win, a name held by another node's live lease is
refused, and a token's quota counts its names on every node. An epoch comes from one counter that only grows
and is remembered per name (the name's *fence*) after its lease is gone: a lease that expired can be taken by
another node under a higher epoch, and the node that held it, back late, finds the fence above its epoch and
drops the name instead of taking it back.

The node's own tunnels stay in its memory (the MemoryRegistry half): a visitor request never waits on Redis.
Every Redis call has a bounded time; when Redis can't be reached, what needs it (a new name, a visitor for a
name this node doesn't hold) is refused with 503 "registry unavailable" and the heartbeat keeps trying; once
Redis answers again the heartbeat re-asserts this node's leases (re-creating those a restarted Redis lost).

One node id is one running node: each node keeps a short-lived *presence* under its id, and a node starting under
an id whose presence is still refreshed refuses to start (two nodes with one id would take each other's leases
for their own), while one whose presence lapses unrefreshed was left by a node that died: the restart goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..config import ClusterTarget
from ..errors import ConfigurationError, HttpError
from .registry import MemoryRegistry, RemoteLease, key_digest, leased_thing, registry_unavailable
from .tunnels import AgentTunnel, Tunnel

log = logging.getLogger(__name__)

KEY_PREFIX = "portway:"
DEFAULT_LEASE_TTL = 10.0  # seconds a lease outlives its node's last heartbeat (renewed every third of it)
DEFAULT_CALL_TIMEOUT = 1.0  # seconds any one Redis call may take before the registry counts as unavailable
FENCE_TTL = 86_400.0  # seconds a name's highest epoch is remembered after its last lease
MAX_CONNECTIONS = 128  # to Redis, at once; one more call is refused (503) rather than queued
MAX_LOOKUPS = 64  # visitor lookups of names held elsewhere at once: a flood of unknown hosts leaves room for the rest
# A running node's presence under its id, beside its leases: refreshed every PRESENCE_INTERVAL, gone PRESENCE_TTL
# after the last refresh. A node starting under an id whose presence is fresh waits up to that long: a presence
# refreshed meanwhile is a node still running (refused), one that ends is a node that died (the restart goes on).
DEFAULT_PRESENCE_TTL = 3.0
PRESENCE_POLL = 0.1  # seconds between looks at another node's presence while waiting for it to end


def connect(target: ClusterTarget, timeout: float) -> Redis:
    """A client for `target` whose every connect, read and write gives up after `timeout` seconds, never retried
    (the caller decides what a failure means)."""
    bounded = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0),
               "max_connections": MAX_CONNECTIONS}
    if not target.sentinels:
        return Redis.from_url(target.url, **bounded)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs={"socket_timeout": timeout,
                                                                 "socket_connect_timeout": timeout})
    return sentinel.master_for(target.service, db=target.db, password=target.password, **bounded)


# Every script reads Redis's own clock (TIME), so the nodes' clocks never have to agree. Keys other than the
# declared ones are built from the prefix: the registry needs one Redis (or a Sentinel-watched master), not a
# sharded Redis Cluster.

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

_KEEP_OWNER = """
local function keep_owner(owners, name, now, ttl)
  redis.call('ZADD', owners, now + ttl, name)
  if redis.call('PTTL', owners) < ttl then redis.call('PEXPIRE', owners, ttl) end
end
"""

# KEYS: lease, fence, epoch counter, the claiming owner's names
# ARGV: node, owner, kind, ttl ms, max tunnels (0: any), advertise, name, fence ttl ms, key prefix,
#       the new resume key's digest, the presented resume key's digest ('' for none)
# -> {'ok', epoch, node it was taken over from or ''} | {'taken', node} | {'quota', names held}
# A live lease of another node is taken over only by the agent that held it: same owner, and the resume key it
# was given there (the lease keeps its digest).
CLAIM = _NOW + _KEEP_OWNER + """
local held = redis.call('HMGET', KEYS[1], 'node', 'owner', 'key')
local moved_from = ''
if held[1] and held[1] ~= ARGV[1] then
  if ARGV[11] == '' or held[3] ~= ARGV[11] or held[2] ~= ARGV[2] then return {'taken', held[1]} end
  moved_from = held[1]
end
local ttl = tonumber(ARGV[4])
local max = tonumber(ARGV[5])
if max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if not redis.call('ZSCORE', KEYS[4], ARGV[7]) then
    local count = redis.call('ZCARD', KEYS[4])
    if count >= max then return {'quota', tostring(count)} end
  end
end
local epoch = redis.call('INCR', KEYS[3])
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
if epoch <= fence then
  epoch = fence + 1
  redis.call('SET', KEYS[3], epoch)
end
if held[2] and held[2] ~= ARGV[2] then redis.call('ZREM', ARGV[9] .. 'owner:' .. held[2], ARGV[7]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'owner', ARGV[2], 'kind', ARGV[3], 'epoch', epoch,
           'advertise', ARGV[6], 'key', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], epoch, 'PX', ARGV[8])
keep_owner(KEYS[4], ARGV[7], now, ttl)
return {'ok', tostring(epoch), moved_from}
"""

# KEYS: epoch counter, the live nodes (sorted set, scored by when each is no longer alive), their addresses (hash)
# ARGV: node, ttl ms, fence ttl ms, key prefix, advertise, whether the node is alive for new agents ('1' or '0'),
#       then (name, owner, kind, epoch, resume key digest) for every name held
# -> {name, epoch (0: lost to another node), ...}
RENEW = _NOW + _KEEP_OWNER + """
local node, ttl, fence_ttl, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if ARGV[6] == '1' then
  redis.call('ZADD', KEYS[2], now + ttl, node)
  redis.call('HSET', KEYS[3], node, ARGV[5])
else
  redis.call('ZREM', KEYS[2], node)
end
local result = {}
for i = 7, #ARGV, 5 do
  local name, owner, kind, epoch, key = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  local lease, fence_key = prefix .. 'lease:' .. name, prefix .. 'fence:' .. name
  local holder = redis.call('HGET', lease, 'node')
  if holder == node then
    redis.call('PEXPIRE', lease, ttl)
    epoch = tonumber(redis.call('HGET', lease, 'epoch'))
  elseif holder then
    epoch = 0
  else
    -- the lease expired or Redis lost it: take it back unless another node held the name since
    local fence = tonumber(redis.call('GET', fence_key) or '0')
    if fence > epoch then
      epoch = 0
    else
      if epoch == 0 then epoch = redis.call('INCR', KEYS[1]) end
      if tonumber(redis.call('GET', KEYS[1]) or '0') < epoch then redis.call('SET', KEYS[1], epoch) end
      redis.call('HSET', lease, 'node', node, 'owner', owner, 'kind', kind, 'epoch', epoch, 'advertise', ARGV[5],
                 'key', key)
      redis.call('PEXPIRE', lease, ttl)
    end
  end
  if epoch > 0 then
    redis.call('SET', fence_key, epoch, 'PX', fence_ttl)
    keep_owner(prefix .. 'owner:' .. owner, name, now, ttl)
  end
  result[#result + 1] = name
  result[#result + 1] = epoch
end
return result
"""

# KEYS: lease, its owner's names. ARGV: node, epoch, name. -> 1 released, 0 not ours (any more)
RELEASE = """
local held = redis.call('HMGET', KEYS[1], 'node', 'epoch')
if held[1] == ARGV[1] and held[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: the live nodes (sorted set), their addresses (hash). ARGV: this node.
# -> {node, advertise, ...} for every other node alive and not stopping
NODES = _NOW + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, node in ipairs(gone) do redis.call('HDEL', KEYS[2], node) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local result = {}
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if node ~= ARGV[1] then
    local advertise = redis.call('HGET', KEYS[2], node)
    if advertise then
      result[#result + 1] = node
      result[#result + 1] = advertise
    end
  end
end
return result
"""

# KEYS: a node id's presence. ARGV: this node's presence value, TTL ms. -> nil when refreshed, else the value of
# the other node that holds the id (not overwritten)
PRESENCE_REFRESH = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS: a node id's presence. ARGV: this node's presence value. -> 1 removed, 0 not ours
PRESENCE_END = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: an address's failure times. ARGV: max failures, window ms. -> ms until it may try again, or -1
FAILURE_WAIT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then return -1 end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tonumber(oldest[2]) + tonumber(ARGV[2]) - now
"""

# KEYS: an address's failure times. ARGV: max failures, window ms, a unique member. Keeps the latest `max` only.
FAILURE_RECORD = _NOW + """
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[1]) + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A lease this node keeps alive for something other than a tunnel's name (a TCP port): for whom, of what
    kind, and what to do when another node turns out to hold it."""

    owner: str
    kind: str
    lost: Callable[[], None]


def _address_of(presence: bytes) -> str:
    """The advertised address in a node's presence value ("INSTANCE ADDRESS")."""
    return presence.decode("utf-8", "replace").partition(" ")[2] or "an unknown address"


def _seen_ago(ttl_ms: int, remaining_ms: int) -> float:
    """Seconds since a presence with `remaining_ms` of its `ttl_ms` left was last refreshed."""
    return max(0.0, (ttl_ms - max(remaining_ms, 0)) / 1000)


class RedisFailures:
    """auth.FailureThrottle's sliding window over failed token attempts per address, kept in Redis so that every
    node counts every node's failures (same limits, same meaning: blocked while `max_failures` fall within the
    last `window` seconds; only the latest `max_failures` times are kept, and an address's key expires with
    its window)."""

    def __init__(self, registry: RedisRegistry, max_failures: int, window: float) -> None:
        self.registry = registry
        self.max_failures = max_failures
        self.window_ms = max(1, round(window * 1000))

    def _key(self, address: str) -> str:
        return f"{KEY_PREFIX}authfail:{address}"

    async def retry_after(self, address: str) -> float | None:
        wait = await self.registry.ask(self.registry.scripts["failure_wait"](
            keys=[self._key(address)], args=[self.max_failures, self.window_ms]))
        return None if int(wait) < 0 else int(wait) / 1000

    async def record_failure(self, address: str) -> None:
        await self.registry.ask(self.registry.scripts["failure_record"](
            keys=[self._key(address)], args=[self.max_failures, self.window_ms, secrets.token_hex(8)]))


class RedisRegistry(MemoryRegistry):
    """A node's registry in a cluster: its own tunnels in memory, every node's names as leases in Redis."""

    def __init__(self, target: ClusterTarget | str, node_id: str, advertise: str, *, secret: str | None = None,
                 lease_ttl: float = DEFAULT_LEASE_TTL, call_timeout: float = DEFAULT_CALL_TIMEOUT,
                 presence_ttl: float = DEFAULT_PRESENCE_TTL, auth_failures_per_address: int = 10,
                 auth_failure_window: float = 60.0) -> None:
        super().__init__()
        self.target = ClusterTarget.parse(target) if isinstance(target, str) else target
        self.node_id = node_id
        self.advertise = advertise
        self.secret = secret
        self.lease_ttl = lease_ttl
        self.call_timeout = call_timeout
        self.presence_ttl = presence_ttl
        # this process's presence under its node id: a random instance (a restart is another one) and its address
        self.presence = f"{secrets.token_hex(8)} {advertise}"
        self.redis = connect(self.target, call_timeout)
        self.scripts = {name: self.redis.register_script(text) for name, text in (
            ("claim", CLAIM), ("renew", RENEW), ("release", RELEASE), ("nodes", NODES),
            ("presence_refresh", PRESENCE_REFRESH), ("presence_end", PRESENCE_END),
            ("failure_wait", FAILURE_WAIT), ("failure_record", FAILURE_RECORD))}
        self.failures = RedisFailures(self, auth_failures_per_address, auth_failure_window)
        self.reachable = True  # as far as the last call knew
        self._epochs: dict[str, int] = {}  # name -> the epoch of this node's lease on it, as last seen
        self._held: dict[str, HeldLease] = {}  # leases kept alive besides the tunnels' names (TCP ports)
        self._heartbeat: asyncio.Task | None = None
        self._presence: asyncio.Task | None = None
        self._present = False  # this node's presence is (as far as it knows) the one under its id
        self._background: set[asyncio.Task] = set()
        self._lookups = 0  # held_elsewhere() calls waiting on Redis
        self.leaving = False  # stopping: no longer listed among the live nodes agents are sent to

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl * 1000))

    # talking to Redis
    async def ask(self, call):
        """Await one Redis call within the call timeout; HttpError(503) when Redis can't answer in time."""
        try:
            async with asyncio.timeout(self.call_timeout):
                reply = await call
        except ResponseError:
            log.exception("cluster registry %s refused a command", self.target)
            raise registry_unavailable() from None
        except (RedisError, OSError, TimeoutError) as error:
            if self.reachable:
                log.warning("cluster registry %s unreachable (%s): tunnels held here keep serving; new "
                            "registrations are refused until it answers again", self.target,
                            str(error) or type(error).__name__)
            self.reachable = False
            raise registry_unavailable() from None
        if not self.reachable:
            log.warning("cluster registry %s reachable again", self.target)
            self.reachable = True
        return reply

    # lifecycle
    async def start(self) -> None:
        """Join the cluster (the cluster secret must match the one the first node set) and start the heartbeat.
        Raises ConfigurationError when Redis can't be reached or the secret doesn't match."""
        presented = hmac.new(b"portway cluster secret", (self.secret or "").encode(), hashlib.sha256).hexdigest()
        key = f"{KEY_PREFIX}cluster-secret"
        try:
            async with asyncio.timeout(self.call_timeout * 3):
                await self.redis.set(key, presented, nx=True)
                expected = await self.redis.get(key)
        except (RedisError, OSError, TimeoutError) as error:
            raise ConfigurationError(f"cannot reach the cluster registry at {self.target}: "
                                     f"{str(error) or type(error).__name__}") from None
        if not hmac.compare_digest(expected or b"", presented.encode()):
            raise ConfigurationError(f"--cluster-secret does not match the one the cluster at {self.target} "
                                     "was started with")
        try:
            await self._take_node_id()
        except (RedisError, OSError, TimeoutError) as error:
            raise ConfigurationError(f"cannot reach the cluster registry at {self.target}: "
                                     f"{str(error) or type(error).__name__}") from None
        try:
            await self.renew()  # listed among the live nodes from the start
        except HttpError:
            pass  # Redis went away right after answering: the heartbeat keeps trying
        loop = asyncio.get_running_loop()
        self._presence = loop.create_task(self._keep_presence())
        self._heartbeat = loop.create_task(self._keep_leases())

    async def _take_node_id(self) -> None:
        """Record this node's presence under its id. Another presence there is either a node still running
        (its presence is refreshed while we look: ConfigurationError) or one that died (it ends within
        presence_ttl: we wait for that, saying so)."""
        key = self._presence_key()
        ttl_ms = max(1, round(self.presence_ttl * 1000))
        loop = asyncio.get_running_loop()
        waited = False

        async def look() -> tuple[bytes | None, int]:
            async with asyncio.timeout(self.call_timeout * 3):
                return await self.redis.get(key), await self.redis.pttl(key)

        while True:
            async with asyncio.timeout(self.call_timeout * 3):
                if await self.redis.set(key, self.presence, nx=True, px=ttl_ms):
                    self._present = True
                    return
            seen, remaining_ms = await look()
            if seen is None:
                continue  # it ended just now
            if not waited:
                log.warning("node id %r was last seen %.1f s ago (from %s): waiting up to %.1f s to tell a node "
                            "restarted after it died from one still running", self.node_id,
                            _seen_ago(ttl_ms, remaining_ms), _address_of(seen), max(remaining_ms, 0) / 1000)
                waited = True
            # a presence without a TTL (not one a node wrote) counts as one that is never refreshed
            deadline = loop.time() + (remaining_ms if remaining_ms >= 0 else ttl_ms) / 1000 + PRESENCE_POLL
            last_remaining = remaining_ms
            while loop.time() < deadline:
                await asyncio.sleep(PRESENCE_POLL)
                now_seen, remaining_ms = await look()
                if now_seen is None:
                    break  # it ended: that node is gone
                if now_seen != seen or remaining_ms > last_remaining:  # refreshed: that node is running
                    raise ConfigurationError(
                        f"node id {self.node_id!r} is live in the cluster (heartbeat "
                        f"{_seen_ago(ttl_ms, remaining_ms):.1f} s ago from {_address_of(now_seen)}); pick another "
                        "--node-id")
                last_remaining = remaining_ms
            else:
                async with asyncio.timeout(self.call_timeout * 3):  # outlived its TTL unrefreshed: stale
                    await self.scripts["presence_end"](keys=[key], args=[seen])

    async def _keep_presence(self) -> None:
        """Refresh this node's presence every third of its TTL; another node holding the id (it started while
        this one could not reach Redis) is logged, once."""
        ttl_ms = max(1, round(self.presence_ttl * 1000))
        while True:
            await asyncio.sleep(self.presence_ttl / 3)
            try:
                other = await self.ask(self.scripts["presence_refresh"](keys=[self._presence_key()],
                                                                        args=[self.presence, ttl_ms]))
            except HttpError:
                continue  # unreachable: logged once by ask()
            if other is not None and self._present:
                log.error("node id %r is also used by the node at %s (it started while this node could not "
                          "reach Redis): stop one of them, or give it another --node-id", self.node_id,
                          _address_of(other))
            self._present = other is None

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._presence is not None:
            self._presence.cancel()
            if self._present:  # a node stopped on purpose: its id is free again at once
                task = asyncio.get_running_loop().create_task(self._end_presence())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        if self._background:  # releases of names given up just before: let them reach Redis, boundedly
            await asyncio.wait(self._background, timeout=self.call_timeout * 2)
        for task in self._background:
            task.cancel()
        await self.redis.aclose()
        pool = self.redis.connection_pool
        await pool.disconnect()  # a Sentinel's master client doesn't own its pool: aclose() leaves it open
        if isinstance(pool, SentinelConnectionPool):
            for sentinel in pool.sentinel_manager.sentinels:
                await sentinel.aclose()

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                await self.renew()
            except HttpError:
                pass  # unreachable: logged once by ask(); the next beat tries again

    # the shared half
    async def lease(self, name: str, *, owner: str, kind: str, max_tunnels: int, proof: str | None = None,
                    key: str = "") -> None:
        verdict, detail, *moved = await self.ask(self.scripts["claim"](
            keys=[self._lease_key(name), self._fence_key(name), f"{KEY_PREFIX}epoch", self._owner_key(owner)],
            args=[self.node_id, owner, kind, self._ttl_ms, max_tunnels, self.advertise, name,
                  round(FENCE_TTL * 1000), KEY_PREFIX, key_digest(key), key_digest(proof)]))
        detail = detail.decode()
        if verdict == b"taken":
            raise HttpError(409, f"{leased_thing(name)} is already in use (on relay node {detail})")
        if verdict == b"quota":
            raise HttpError(403, f"this token may hold {max_tunnels} tunnel(s) at once and holds {detail} "
                                 "over the cluster")
        self._epochs[name] = int(detail)
        if moved and moved[0]:
            log.info("tunnel %s: its agent moved here from relay node %s; lease taken over under epoch %s", name,
                     moved[0].decode(), detail)

    async def live_nodes(self) -> list[tuple[str, str]]:
        reply = await self.ask(self.scripts["nodes"](keys=self._node_keys, args=[self.node_id]))
        return [(reply[index].decode(), reply[index + 1].decode()) for index in range(0, len(reply), 2)]

    async def leave(self) -> None:
        self.leaving = True
        await self.renew()

    async def held_elsewhere(self, name: str) -> RemoteLease | None:
        if self._lookups >= MAX_LOOKUPS:
            raise registry_unavailable()
        self._lookups += 1
        try:
            node, advertise, kind, epoch = await self.ask(
                self.redis.hmget(self._lease_key(name), "node", "advertise", "kind", "epoch"))
        finally:
            self._lookups -= 1
        if node is None or node.decode() == self.node_id:
            return None
        return RemoteLease(node.decode(), (advertise or b"").decode(), (kind or b"").decode(), int(epoch or 0))

    async def renew(self) -> None:
        """One heartbeat: extend every lease this node holds, re-create those Redis lost, and drop the tunnels
        whose name another node holds now."""
        args: list = [self.node_id, self._ttl_ms, round(FENCE_TTL * 1000), KEY_PREFIX, self.advertise,
                      "0" if self.leaving else "1"]
        for name, tunnel in self._tunnels.items():
            args += [name, tunnel.owner, tunnel.kind, self._epochs.get(name, 0),
                     key_digest(getattr(tunnel, "resume_key", None))]
        for name, held in self._held.items():
            # a re-created port lease carries no key: only a lease the claim wrote can be taken over at once
            args += [name, held.owner, held.kind, self._epochs.get(name, 0), ""]
        reply = await self.ask(self.scripts["renew"](keys=[f"{KEY_PREFIX}epoch", *self._node_keys], args=args))
        for index in range(0, len(reply), 2):
            name, epoch = reply[index].decode(), int(reply[index + 1])
            if epoch:
                self._epochs[name] = epoch
            else:
                self._lose(name)
        for name in set(self._epochs) - set(self._tunnels) - set(self._held):
            del self._epochs[name]  # a lease taken but never used: left to expire in Redis

    def _lose(self, name: str) -> None:
        tunnel = self._tunnels.get(name)
        self._epochs.pop(name, None)
        held = self._held.pop(name, None)
        if held is not None:
            log.warning("%s: another relay node holds it now (this node's lease lapsed); dropping it here",
                        leased_thing(name))
            held.lost()
        if tunnel is None:
            return
        log.warning("tunnel %s: another relay node holds its name now (this node's lease lapsed); dropping it "
                    "here", name)
        if isinstance(tunnel, AgentTunnel) and tunnel.session is not None and not self.leaving:
            tunnel.session.close()  # the agent reconnects and learns where the name is
        # (a stopping node is handing its agents over: the agent took its name elsewhere and is about to say
        # GO_AWAY here; closing the link would cut the exchanges it still finishes on it)
        super().remove(tunnel)

    # the local half, with the leases behind it
    def remove(self, tunnel: Tunnel) -> None:
        held = self._tunnels.get(tunnel.name) is tunnel
        super().remove(tunnel)
        epoch = self._epochs.get(tunnel.name)
        if held and epoch:
            task = asyncio.get_running_loop().create_task(self._release(tunnel.name, tunnel.owner, epoch))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def hold(self, name: str, *, owner: str, kind: str, lost: Callable[[], None]) -> None:
        self._held[name] = HeldLease(owner, kind, lost)

    def let_go(self, name: str) -> None:
        held = self._held.pop(name, None)
        epoch = self._epochs.get(name)
        if held is not None and epoch:
            task = asyncio.get_running_loop().create_task(self._release(name, held.owner, epoch))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release(self, name: str, owner: str, epoch: int) -> None:
        if name in self._tunnels or name in self._held:
            return  # taken again here meanwhile: the lease is the new holder's
        self._epochs.pop(name, None)
        try:
            await self.ask(self.scripts["release"](keys=[self._lease_key(name), self._owner_key(owner)],
                                                   args=[self.node_id, epoch, name]))
        except HttpError:
            pass  # unreachable: the lease expires on its own within its TTL

    _node_keys = [f"{KEY_PREFIX}nodes", f"{KEY_PREFIX}node-addresses"]

    async def _end_presence(self) -> None:
        try:
            await self.ask(self.scripts["presence_end"](keys=[self._presence_key()], args=[self.presence]))
        except HttpError:
            pass  # unreachable: the presence ends with its TTL

    def _presence_key(self) -> str:
        return f"{KEY_PREFIX}node:{self.node_id}"

    @staticmethod
    def _lease_key(name: str) -> str:
        return f"{KEY_PREFIX}lease:{name}"

    @staticmethod
    def _fence_key(name: str) -> str:
        return f"{KEY_PREFIX}fence:{name}"

    @staticmethod
    def _owner_key(owner: str) -> str:
        return f"{KEY_PREFIX}owner:{owner}"
