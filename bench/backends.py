"""Backend kinds for the simulator (`bench/sim.py`) and the HTTP emulator (`bench/emulator.py`),
pure and clock-injected, the same for every batching mode:

- `knative`: `bench/knative.py`'s `Service` (pods that autoscale, cold starts, cost in
  ready-pod-seconds);
- `fixed`: a server of fixed capacity (a GPU box, Triton or KServe without autoscaling):
  `workers` workers (default 1), each runs one batch at a time; a batch takes
  `overhead` + the profile's time (a + c*b with its log-normal noise); batches that find no free
  worker wait in one FIFO queue at the server, unbounded unless `queue_limit` is set (a batch
  arriving when `queue_limit` batches already wait is answered 503 at once); no autoscaling,
  no cold start; cost is busy worker-seconds, utilisation = busy worker-seconds / (workers x
  time);
- `limited`: a fixed server that admits at most `limit` batches (running + queued, default
  `workers`): a batch arriving when `limit` are already in the server is refused at once with
  429 (it does not wait).

Every kind is driven the same way (`Backend`): the caller owns the clock and calls `refuse`
first (the status the server answers at once instead of taking the batch, or None), then
`arrive`, and `start` at the times `arrive` and `tick` return and whenever a batch `finish`es;
`start` hands out the batches to run now with their worker (or pod).

Capacity of a fixed or limited server at batch size b (requests per second, every worker busy):
k * b / t(b), t(b) = overhead + a + c*b (`capacity`).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

from bench.knative import Service, ServiceConfig
from bench.profiles import Profile

__all__ = [
    "KINDS",
    "Backend",
    "BackendConfig",
    "Server",
    "ServerConfig",
    "Worker",
    "backend_config",
    "capacity",
    "from_json",
    "make_backend",
]

T = TypeVar("T")
Kind = Literal["knative", "fixed", "limited"]
KINDS: tuple[Kind, ...] = ("knative", "fixed", "limited")

# A fixed server has no autoscaler; the caller still samples it at this interval (seconds)
# for its series.
SAMPLE_EVERY = 2.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A server of fixed capacity; the same for every batching mode."""

    kind: Literal["fixed", "limited"] = "fixed"
    workers: int = 1  # batches run at once
    overhead: float = 0.0  # seconds added to every call (the server's own per-call cost)
    queue_limit: int | None = None  # fixed: batches that may wait (None: unbounded); then 503
    limit: int | None = None  # limited: batches in the server at most (default: workers); 429
    sample_every: float = SAMPLE_EVERY  # seconds between `tick`s (samples for the series)

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "limited"):
            raise ValueError(f"unknown server kind {self.kind!r}: fixed or limited")
        if self.workers < 1 or not 0 <= self.overhead < math.inf:
            raise ValueError(f"a server needs at least one worker and overhead >= 0: {self}")
        if self.queue_limit is not None and self.queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0: {self}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1: {self}")
        if self.sample_every <= 0:
            raise ValueError(f"sample_every must be positive: {self}")

    @property
    def admitted(self) -> int | None:
        """Batches in the server (running + waiting) beyond which it refuses; None: never."""
        if self.kind == "limited":
            return self.workers if self.limit is None else self.limit
        return None if self.queue_limit is None else self.workers + self.queue_limit

    @property
    def refusal(self) -> int:
        """The status of a refusal: 429 (limited), 503 (fixed, its queue full)."""
        return 429 if self.kind == "limited" else 503

    def scaled(self, factor: float) -> ServerConfig:
        """The same server sampled `factor` times as often (its service times are the model's
        and do not scale)."""
        if factor <= 0:
            raise ValueError("the time scale must be positive")
        return replace(self, sample_every=self.sample_every / factor)

    def as_json(self) -> dict[str, Any]:
        """The emulator's reset body's `backend` (`from_json` reads it back)."""
        return {
            "kind": self.kind,
            "workers": self.workers,
            "overhead_ms": self.overhead * 1000.0,
            "limit": self.limit,
            "queue_limit": self.queue_limit,
        }

    def describe(self) -> str:
        text = f"{self.kind}: {self.workers} worker(s), overhead {self.overhead * 1000:g} ms"
        if self.kind == "limited":
            text += f", limit {self.admitted} batches"
        elif self.queue_limit is not None:
            text += f", queue limit {self.queue_limit}"
        return text


BackendConfig = ServiceConfig | ServerConfig


class Backend(Protocol[T]):
    """What the simulator and the emulator drive; see the module's docstring."""

    kind: str
    waiting: deque[T]
    running: int
    cold_starts: int

    @property
    def interval(self) -> float:
        """Seconds between `tick`s (the autoscaler's, or the sampling of a fixed server)."""
        ...

    @property
    def cost(self) -> float:
        """Ready-pod-seconds (knative) or busy worker-seconds (servers), up to `account`."""
        ...

    def refuse(self, now: float) -> int | None: ...
    def arrive(self, item: T, now: float) -> list[float]: ...
    def start(self, now: float) -> list[tuple[Any, T]]: ...
    def finish(self, unit: Any, now: float) -> None: ...
    def tick(self, now: float) -> list[float]: ...
    def account(self, now: float) -> None: ...
    def serving(self, now: float) -> int: ...
    def service_time(self, profile: Profile, size: int, rng: random.Random) -> float: ...
    def fail_waiting(self) -> Iterable[T]: ...
    def forget(self, item: T, now: float) -> None: ...


class Worker:
    __slots__ = ("busy", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.busy = False


class Server(Generic[T]):
    """A fixed or concurrency-limited server (`ServerConfig`): the `Backend` of those kinds."""

    def __init__(self, config: ServerConfig = ServerConfig(), start: float = 0.0) -> None:
        self.config = config
        self.kind: str = config.kind
        self.workers = [Worker(i) for i in range(config.workers)]
        self.waiting: deque[T] = deque()
        self.running = 0
        self.cold_starts = 0  # never: no autoscaler
        self.busy_seconds = 0.0
        self.refused = 0  # batches refused (429 or 503)
        self.started = start
        self._last = start

    @property
    def interval(self) -> float:
        return self.config.sample_every

    @property
    def cost(self) -> float:
        return self.busy_seconds

    def utilisation(self, now: float) -> float:
        """Busy worker-seconds over worker-seconds since the start (0 to 1)."""
        self.account(now)
        span = (now - self.started) * len(self.workers)
        return self.busy_seconds / span if span > 0 else 0.0

    def account(self, now: float) -> None:
        """Add busy worker-seconds up to `now`."""
        if now > self._last:
            self.busy_seconds += self.running * (now - self._last)
            self._last = now

    def refuse(self, now: float) -> int | None:
        """The status the server answers a batch arriving now with, refusing it (None: it
        takes it); a refusal is counted."""
        bound = self.config.admitted
        if bound is not None and self.running + len(self.waiting) >= bound:
            self.refused += 1
            return self.config.refusal
        return None

    def arrive(self, item: T, now: float) -> list[float]:
        """Queue a batch the server took (`refuse` said None); call `start` next."""
        self.waiting.append(item)
        return []

    def start(self, now: float) -> list[tuple[Worker, T]]:
        """Free workers take waiting batches, oldest first; what each worker now runs."""
        self.account(now)
        taken: list[tuple[Worker, T]] = []
        for worker in self.workers:
            if not self.waiting:
                break
            if worker.busy:
                continue
            worker.busy = True
            self.running += 1
            taken.append((worker, self.waiting.popleft()))
        return taken

    def finish(self, worker: Worker, now: float) -> None:
        """`worker`'s batch ended; call `start` next for the waiting ones."""
        self.account(now)
        if not worker.busy:
            raise RuntimeError(f"worker {worker.index} finished a batch it was not running")
        worker.busy = False
        self.running -= 1

    def tick(self, now: float) -> list[float]:
        self.account(now)
        return []

    def serving(self, now: float) -> int:
        """Workers busy now."""
        return self.running

    def service_time(self, profile: Profile, size: int, rng: random.Random) -> float:
        return self.config.overhead + profile.sample(size, rng)

    def fail_waiting(self) -> Iterable[T]:
        items = list(self.waiting)
        self.waiting.clear()
        return items

    def forget(self, item: T, now: float) -> None:
        """A waiting batch's client left: it leaves the queue."""
        if item in self.waiting:
            self.waiting.remove(item)


def make_backend(config: BackendConfig, start: float = 0.0) -> Backend[Any]:
    """The backend `config` describes, its clock starting at `start`."""
    if isinstance(config, ServerConfig):
        return Server[Any](config, start)
    return Service[Any](config, start)


def capacity(profile: Profile, config: ServerConfig, batch: int) -> float:
    """Requests per second a server answers with every worker busy on batches of `batch`
    (mean service time): workers * batch / t(batch)."""
    return config.workers * batch / (config.overhead + profile.mean(batch))


def from_json(body: Any, knative: ServiceConfig | None = None) -> BackendConfig:
    """A backend from JSON such as `{"kind": "fixed", "workers": 2, "overhead_ms": 20}`
    (`kind` knative, fixed or limited; the rest as `backend_config`); ValueError says what is
    wrong."""
    if not isinstance(body, dict):
        raise ValueError('"backend" must be a JSON object with a "kind"')
    unknown = set(body) - {"kind", "workers", "overhead_ms", "limit", "queue_limit"}
    if unknown:
        raise ValueError(f"unknown backend settings: {', '.join(sorted(unknown))}")

    def integer(key: str) -> int | None:
        value = body.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"backend {key} must be an integer")
        return value

    overhead = body.get("overhead_ms", 0.0)
    if not isinstance(overhead, int | float) or isinstance(overhead, bool):
        raise ValueError("backend overhead_ms must be a number")
    return backend_config(
        str(body.get("kind", "knative")),
        1 if integer("workers") is None else int(body["workers"]),
        float(overhead),
        integer("limit"),
        integer("queue_limit"),
        knative,
    )


def backend_config(
    kind: str,
    workers: int = 1,
    overhead_ms: float = 0.0,
    limit: int | None = None,
    queue_limit: int | None = None,
    knative: ServiceConfig | None = None,
) -> BackendConfig:
    """The backend of a CLI's `--backend`, `--workers`, `--overhead-ms`, `--limit`,
    `--queue-limit` (ValueError for a bad combination)."""
    if kind == "knative":
        if limit is not None or queue_limit is not None or overhead_ms or workers != 1:
            raise ValueError(
                "--workers, --overhead-ms, --limit and --queue-limit are for the fixed and "
                "limited backends; Knative's pods autoscale"
            )
        return knative or ServiceConfig()
    if kind == "fixed" and limit is not None:
        raise ValueError("--limit is for the limited backend (fixed: --queue-limit)")
    if kind == "limited" and queue_limit is not None:
        raise ValueError("--queue-limit is for the fixed backend (limited: --limit)")
    if kind not in ("fixed", "limited"):
        raise ValueError(f"unknown backend {kind!r}: one of {', '.join(KINDS)}")
    return ServerConfig(
        kind="limited" if kind == "limited" else "fixed",
        workers=workers,
        overhead=overhead_ms / 1000.0,
        queue_limit=queue_limit,
        limit=limit,
    )
