"""A leader lease in Redis, so that one control plane process at a time runs the fleet tuner.

The lease is a key holding `<holder>|<token>` with a TTL. `hold()` takes it when it is free
and renews it while this holder has it; each taking increments a counter, the fencing token,
so every term of leadership has its own. A holder that stops renewing (killed, partitioned,
paused) loses the lease when the TTL runs out, and another takes it on its next `hold()`.

A lease alone cannot stop a paused old leader from writing after its term: its writes are
therefore fenced (`fence`): `RedisStore.put` watches the lease key in the same transaction and
refuses the write unless the lease still holds this holder's value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from controlplane.domain.ports import MAX_TERM, check_lease
from mlproxy_kernel import keys

__all__ = ["MAX_LEASE_S", "MAX_TERM", "RedisLease", "valid_term"]

log = logging.getLogger(__name__)

# The longest lease a control plane writes (MLPROXY_TUNER_LEASE_S's bound). A lease with a
# longer TTL, or none, was written by someone else and is taken over.
MAX_LEASE_S = 3600.0


def valid_term(raw: Any) -> int | None:
    """`raw` (a counter's or a lease's text) as a term a control plane takes, else None: junk
    from a Redis writer is shown or ignored, never trusted."""
    try:
        term = int(raw or 0)
    except ValueError:
        return None
    return term if 0 <= term <= MAX_TERM else None


# KEYS: lease, token counter; ARGV: holder, ttl ms, floor, longest ttl ms. {token, forged}:
# token 0 if not taken; forged 1 if the lease taken was one no control plane writes (no TTL,
# or a TTL longer than any lease may be: a Redis writer's, e.g. the ext_proc user's; left,
# it would stop the tuner for good). The token is above `floor` even if the counter was lost
# (Redis emptied): terms never go back. Terms are written with '%d': Lua's numbers are doubles
# that it prints with "%.14g", so from 10^14 a term was written "1e+14" and the holder never
# found its own lease again (red team 5); a term beyond MAX_TERM (where doubles stop counting
# exactly) is refused: {-1, forged}.
_TAKE = """
local pttl = redis.call('PTTL', KEYS[1])
local forged = 0
if pttl == -1 or pttl > tonumber(ARGV[4]) then
  forged = 1
elseif pttl ~= -2 then
  return {0, 0}
end
local token = redis.call('INCR', KEYS[2])
if token <= tonumber(ARGV[3]) then
  token = tonumber(ARGV[3]) + 1
  redis.call('SET', KEYS[2], string.format('%d', token))
end
if token > tonumber(ARGV[5]) then return {-1, forged} end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. string.format('%d', token), 'PX', ARGV[2])
return {token, forged}
"""
# KEYS: lease; ARGV: value, ttl ms. 1 if renewed (still ours), else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: lease; ARGV: value. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLease:
    def __init__(
        self,
        client: aioredis.Redis,
        holder: str,
        ttl: float,
        key: str = keys.TUNER_LEASE,
        token_key: str = keys.TUNER_TOKEN,
        floor: Callable[[], int] = lambda: 0,
    ) -> None:
        check_lease(holder, ttl)
        self.redis = client
        self.holder = holder
        self.ttl = ttl
        self.key = key
        self.token_key = token_key
        self.token: int | None = None  # the fencing token while this holder has the lease
        # The highest term seen, and any other known floor (the store's): a new term is
        # above both, even after Redis lost the counter.
        self.highest = 0
        self._floor = floor

    @property
    def value(self) -> str | None:
        return None if self.token is None else f"{self.holder}|{self.token}"

    @property
    def fence(self) -> tuple[str, str] | None:
        """(key, value) a fenced write checks; None while not leading."""
        value = self.value
        return None if value is None else (self.key, value)

    async def hold(self) -> int | None:
        """Take or renew the lease; the fencing token if this holder has it now, else None."""
        ttl_ms = max(1, round(self.ttl * 1000))
        if self.value is not None:
            renewed: Any = await self.redis.eval(_RENEW, 1, self.key, self.value, ttl_ms)
            if int(renewed):
                return self.token
            log.warning("tuner lease lost (term %d): another control plane leads now", self.token)
            self.token = None
        floor = min(max(self.highest, self._floor()), MAX_TERM)
        longest = round(MAX_LEASE_S * 1000)
        try:
            taken: Any = await self.redis.eval(
                _TAKE, 2, self.key, self.token_key, self.holder, ttl_ms, floor, longest, MAX_TERM
            )
        except ResponseError as err:  # INCR on a counter that is no integer, or at its end
            taken = (-1, 0)
            why = str(err)[:200]
        else:
            why = "a term beyond any a control plane reaches"
        token, forged = (int(x) for x in taken)
        if token < 0:
            log.error(
                "the tuner's term counter in Redis (%s) is unusable (%s): no control plane "
                "wrote that, so someone else who can write to Redis did. The fleet tuner "
                "stops until it is fixed: delete %s and %s (a control plane counts again "
                "from its store's highest term)",
                self.token_key,
                why,
                self.token_key,
                self.key,
            )
            return None
        if token:
            self.token = token
            self.highest = max(self.highest, self.token)
            if forged:
                log.error(
                    "the tuner lease in Redis (%s) had no TTL or one over %g s: no control "
                    "plane writes that, so someone else who can write to Redis did (with "
                    "Redis 6.2, the ext_proc user can: docs/security.md); taken over by %s "
                    "(term %d). Check who writes there",
                    self.key,
                    MAX_LEASE_S,
                    self.holder,
                    self.token,
                )
            else:
                log.info("tuner lease taken by %s (term %d)", self.holder, self.token)
        return self.token

    async def release(self) -> None:
        """Give the lease up (on shutdown), so that another holder need not wait for the TTL."""
        value = self.value
        self.token = None
        if value is not None:
            await self.redis.eval(_RELEASE, 1, self.key, value)

    async def current(self) -> tuple[str, int] | None:
        """Who holds the lease now, and its term; None if nobody."""
        raw = await self.redis.get(self.key)
        if raw is None:
            return None
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        holder, _, token = text.rpartition("|")
        try:
            term = int(token)
        except ValueError:
            return text[:64], 0  # not a control plane's value: shown, not trusted
        if valid_term(term) is None:  # no term a control plane takes
            return holder[:64], 0
        self.highest = max(self.highest, term)
        return holder[:64], term
