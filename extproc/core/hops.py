"""The time a request spends outside ext_proc: pure, synchronous, clock-injected.

A request's SLA is the client's: it starts when Envoy received the request, not when its
headers reached ext_proc, and it ends when the client has the answer, not when ext_proc hands
it to gRPC (docs/adaptive-batching.md, "Deadlines").

Inbound. Envoy sends its `request.time` attribute: when it received the request's first byte,
by its own wall clock, as an RFC 3339 string. `local_receive - request_time` cannot be trusted
as such: the two hosts' clocks differ by an unknown offset (milliseconds between NTP-synced
hosts; anything otherwise). So for each source (the Envoy, or the Envoys, behind one peer
address) `DelayFloor` keeps the least such difference over a recent window (60 s, in 10 s
slots): a request's excess over it is the time it really spent in Envoy and on the way, the
offset cancelled. Its start is `local_receive - excess`, the excess bounded to [0, SLA] by the
caller. ext_proc's side of the difference is its monotonic clock plus a fixed offset, so a step
of its own wall clock does not count.

Assumptions, and what happens when they fail:
- Within a window, some request of each source reaches ext_proc with almost no delay (the
  least delay is close to zero). A delay that every request shares is taken for clock offset
  and not counted: the estimate then errs toward ext_proc's own arrival, as before this module.
- A clock step is followed. One that shortens the apparent delay (Envoy's clock jumps ahead,
  or ext_proc's monotonic-based one lags) is followed at once: a new least delay. One that
  lengthens it is followed when a whole slot's requests all arrived more than `step` later than
  the floor of the older slots (those are then dropped), else at the latest after the window;
  until then its requests count as late as the bound allows, and are sent at once.
- Clocks drift apart slowly (tens of ppm): the floor is at most a window's drift old.
Hostile values: a time that is not RFC 3339 with an offset, or more than MAX_OFFSET away from
ext_proc's clock, is not used (the caller falls back to its own arrival and counts it). Each
source has its own floor, so one peer's values cannot move another's; at most `max_sources`
floors are kept (the least recently used goes).

Outbound. After ext_proc answers, the reply still has to reach gRPC, cross to Envoy and be sent
to the client. `Hops.allowance` reserves for that the policy's percentile, over recent replies,
of each one's hand-off time (from the batch's answer to the reply written to gRPC) plus the
round trip its body took (from the headers' answer written to gRPC to the body's message read:
across to Envoy, through Envoy, and back on the open stream; an Envoy busy one way is busy the
other way), both measured here on ext_proc's own clock, at most `cap` (half) of the SLA. The
deadline handed to the batching queue is `start + SLA - allowance`. Envoy sends a buffered body
once it has all of it, so the round trip also holds the client's upload: the samples are kept
per policy and each counts for at most its own policy's SLA, so slow uploads (a policy for
them, or a hostile client) move only their own policy's allowance (red team 29).

Not the inbound excess: that includes the wait of a new stream inside ext_proc before its
handler runs (grpcio's asyncio server takes one new call per turn of the event loop), which a
reply on an open stream never pays. With ext_proc's CPU saturated (a closed loop of 64 clients
on two cores) new streams waited 20-24 ms on average while the body's round trip took 1.4 ms:
reserving the inbound excess for the way back set every deadline about 50 ms early (the cap),
so batches left small and late, which took more CPU per request and made the wait longer.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

__all__ = [
    "MAX_OFFSET",
    "DelayFloor",
    "Hops",
    "Inbound",
    "RecentQuantiles",
    "parse_request_time",
]

# The largest plausible difference between Envoy's clock and ext_proc's, in seconds: beyond it
# a `request.time` is taken for garbage.
MAX_OFFSET = 86_400.0
# RFC 3339 with fractional seconds and an offset: "2026-12-02T08:43:39.076151123+00:00" is 35.
_MAX_TIME_CHARS = 48


def parse_request_time(value: str) -> float | None:
    """Seconds since the epoch of Envoy's `request.time` attribute (RFC 3339, e.g.
    "2026-12-02T08:43:39.076151+00:00" or "...Z"), or None if it is not such a time with an
    offset."""
    if not value or len(value) > _MAX_TIME_CHARS or value[0] not in "0123456789":
        return None
    try:
        when = datetime.fromisoformat(value)
        if when.utcoffset() is None:  # a local time of unknown zone
            return None
        seconds = when.timestamp()
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) else None


class DelayFloor:
    """The least one-way delay of one source over the last `window` seconds (`slots` slots):
    what is left of a delay after the clocks' offset (module docstring)."""

    __slots__ = ("_floor", "_slots", "_span", "_step", "_width")

    def __init__(self, window: float = 60.0, slots: int = 6, step: float = 0.1) -> None:
        if window <= 0 or slots < 1 or step <= 0:
            raise ValueError("window and step must be positive, slots at least 1")
        self._width = window / slots
        self._span = slots
        self._step = step
        self._slots: deque[list[float]] = deque()  # [slot number, least delay in it]
        self._floor = math.inf  # the least delay of the slots kept

    def excess(self, delay: float, now: float) -> float:
        """Record `delay` (local receive minus the sender's timestamp, seconds, any offset)
        seen at `now` (monotonic seconds), and return how much it exceeds the floor (>= 0)."""
        slot = float(math.floor(now / self._width))
        q = self._slots
        if q and q[-1][0] == slot:
            last = q[-1]
            last[1] = min(last[1], delay)
        else:
            self._rotate(slot)
            q.append([slot, delay])
            self._floor = min(s[1] for s in q)  # at most `slots` of them, once a slot
        self._floor = min(self._floor, delay)
        return delay - self._floor

    def _rotate(self, slot: float) -> None:
        q = self._slots
        while q and q[0][0] <= slot - self._span:
            q.popleft()
        if len(q) >= 2:
            # The last slot is complete: if every delay in it was well above the older floor,
            # the sender's clock stepped back (or the hop stayed slow for a whole slot): follow.
            last = q[-1][1]
            older = min(q[i][1] for i in range(len(q) - 1))
            if last - older > self._step:
                while len(q) > 1:
                    q.popleft()

    @property
    def floor(self) -> float | None:
        return self._floor if self._slots else None


# Log-spaced bins of RecentQuantiles: bin 0 holds [0, _LO], bin i >= 1 holds
# (_LO * _RATIO**(i-1), _LO * _RATIO**i]; the last one everything above (21 s).
_LO = 1e-4
_RATIO = 1.25
_LOG_RATIO = math.log(_RATIO)
_BINS = 56


def _bin(seconds: float) -> int:
    if not seconds > _LO:  # also NaN
        return 0
    i = 1 + int(math.log(seconds / _LO) / _LOG_RATIO)
    return i if i < _BINS else _BINS - 1


def _upper(i: int) -> float:
    return 0.0 if i == 0 else _LO * _RATIO**i


class RecentQuantiles:
    """Durations of the last `window` seconds, counted in log-spaced bins (25 % wide) per
    slot: O(1) to add, O(bins x slots) to query. A quantile is the upper edge of its bin (an
    overestimate by at most a quarter), 0.0 with no samples."""

    __slots__ = ("_slots", "_span", "_width")

    def __init__(self, window: float = 60.0, slots: int = 6) -> None:
        if window <= 0 or slots < 1:
            raise ValueError("window must be positive, slots at least 1")
        self._width = window / slots
        self._span = slots
        self._slots: deque[tuple[float, list[int]]] = deque()

    def add(self, seconds: float, now: float) -> None:
        slot = float(math.floor(now / self._width))
        q = self._slots
        if not q or q[-1][0] != slot:
            while q and q[0][0] <= slot - self._span:
                q.popleft()
            q.append((slot, [0] * _BINS))
        q[-1][1][_bin(seconds)] += 1

    def quantile(self, q: float, now: float) -> float:
        """The `q` quantile (0 < q <= 1) of the samples of the window ending `now`."""
        oldest = math.floor(now / self._width) - self._span
        counts = [0] * _BINS
        for slot, bins in self._slots:
            if slot > oldest:
                for i, c in enumerate(bins):
                    counts[i] += c
        n = sum(counts)
        if n == 0:
            return 0.0
        rank = max(1, math.ceil(min(max(q, 0.0), 1.0) * n))
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if seen >= rank:
                return _upper(i)
        return _upper(_BINS - 1)  # pragma: no cover - seen reaches n


class Inbound:
    """How one request's `request.time` was taken: its excess delay (seconds, >= 0, not yet
    bounded by an SLA) and `status`: "ok", "missing" (no attribute: excess 0) or "invalid"
    (not a time, or implausibly far: excess 0)."""

    __slots__ = ("excess", "status")

    def __init__(self, excess: float, status: str) -> None:
        self.excess = excess
        self.status = status


_MISSING = Inbound(0.0, "missing")
_INVALID = Inbound(0.0, "invalid")


_V = TypeVar("_V")


def _recent(
    table: OrderedDict[str, _V], key: str, make: Callable[[], _V], bound: int
) -> tuple[_V, str | None]:
    """`table[key]` (made if missing) as the most recently used entry of a table of at most
    `bound`, and the key of the least recently used entry it pushed out, if any."""
    value = table.get(key)
    if value is not None:
        table.move_to_end(key)
        return value, None
    value = table[key] = make()
    if len(table) > bound:
        return value, table.popitem(last=False)[0]
    return value, None


class Hops:
    """One ext_proc process's view of the hops outside it: the inbound floor per source, and
    the allowance reserved for the way back (module docstring)."""

    def __init__(
        self,
        window: float = 60.0,
        slots: int = 6,
        step: float = 0.1,
        cap: float = 0.5,
        max_sources: int = 256,
        refresh: float = 1.0,
        max_policies: int = 1024,
    ) -> None:
        if not 0.0 <= cap <= 1.0 or max_sources < 1 or refresh < 0 or max_policies < 1:
            raise ValueError(
                "cap must be in [0, 1], max_sources and max_policies at least 1, refresh >= 0"
            )
        self._window = window
        self._slots = slots
        self._step = step
        self.cap = cap
        self._max_sources = max_sources
        self._refresh = refresh
        self._max_policies = max_policies
        self._floors: OrderedDict[str, DelayFloor] = OrderedDict()
        # per policy, per reply: hand-off + round trip (the least recently answered goes)
        self._outside: OrderedDict[str, RecentQuantiles] = OrderedDict()
        # (policy, quantile) -> (until, seconds)
        self._cached: dict[tuple[str, float], tuple[float, float]] = {}

    def inbound(
        self, source: str, request_time: str | None, local_wall: float, now: float
    ) -> Inbound:
        """A request from `source` (e.g. the gRPC peer's host) whose headers reached ext_proc
        at `now` (monotonic) = `local_wall` (ext_proc's monotonic clock plus a fixed offset to
        the epoch), stamped `request_time` by Envoy (None if Envoy sent no such attribute)."""
        if request_time is None:
            return _MISSING
        sent = parse_request_time(request_time)
        if sent is None:
            return _INVALID
        delay = local_wall - sent
        if not abs(delay) <= MAX_OFFSET:
            return _INVALID
        floor, _ = _recent(self._floors, source, self._new_floor, self._max_sources)
        return Inbound(floor.excess(delay, now), "ok")

    def _new_floor(self) -> DelayFloor:
        return DelayFloor(self._window, self._slots, self._step)

    def _new_samples(self) -> RecentQuantiles:
        return RecentQuantiles(self._window, self._slots)

    def handed_off(
        self, policy: str, seconds: float, round_trip: float, sla: float, now: float
    ) -> None:
        """A reply of `policy` (whose SLA is `sla` seconds) took `seconds` from its batch's
        answer to being written to gRPC; its request's body took `round_trip` seconds from the
        headers' answer written to its message read (0 if it had none). The round trip holds
        the client's upload too (Envoy sends a buffered body once it has all of it), so one
        reply counts for at most its own SLA, and only for its own policy: a policy for slow
        uploads, or a client sending its body slowly, cannot move another policy's deadlines
        (red team 29)."""
        samples, gone = _recent(self._outside, policy, self._new_samples, self._max_policies)
        if gone is not None:
            for key in [k for k in self._cached if k[0] == gone]:
                del self._cached[key]
        samples.add(min(max(0.0, seconds) + max(0.0, round_trip), max(0.0, sla)), now)

    def allowance(self, policy: str, quantile: float, sla: float, now: float) -> float:
        """Seconds to reserve after ext_proc's answer for `policy`, promising `quantile` of
        its requests within `sla` seconds: that quantile of its recent replies' hand-off plus
        body round trip (the sum per reply: adding two percentiles would reserve more than the
        percentile of the sum), at most `cap` x `sla`; 0 before any reply. Recomputed at most
        every `refresh` seconds."""
        key = (policy, quantile)
        cached = self._cached.get(key)
        if cached is None or now >= cached[0] or now < cached[0] - self._refresh:
            samples = self._outside.get(policy)
            seconds = 0.0 if samples is None else samples.quantile(quantile, now)
            if len(self._cached) > 4 * self._max_policies:  # a percentile or two a policy
                self._cached.clear()
            self._cached[key] = cached = (now + self._refresh, seconds)
        return min(cached[1], self.cap * sla)

    def floor(self, source: str) -> float | None:
        """The least delay (offset included) recently seen from `source`, if any."""
        f = self._floors.get(source)
        return None if f is None else f.floor
