"""The model every peer serves (stdlib only: it runs inside each peer's own virtual environment,
where the project is not installed).

The same model as the benchmark's HTTP emulator behind MLProxy (`bench/emulator.py` with the
`fixed-20-2` profile and `--backend fixed --workers 1`):

- one batch at a time (an asyncio lock held while the batch "runs"; every peer serves from one
  process and one event loop, see the peers' settings);
- a batch of b instances takes t(b) = a + c*b ms with the same log-normal noise as
  `bench.profiles.Profile.sample` (a, c and the noise from the environment: PEER_A_MS,
  PEER_C_MS, PEER_NOISE; PEER_SEED seeds the noise);
- each instance's answer is `predict(instance)`, the emulator's function, so that the client
  checks every answer against its own input;
- with PEER_BATCH_LOG set, each batch appends "<time.monotonic() at its start> <size>" to that
  file (the harness computes the mean batch size of the measured window from it).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence

__all__ = ["PeerModel", "batch_seconds", "predict"]

Number = int | float


def predict(instance: Sequence[Number]) -> list[Number]:
    """What the model answers for one instance (the same as `bench.emulator.predict`)."""
    return [sum(instance), instance[0] * 2 + 1]


def batch_seconds(size: int, a_ms: float, c_ms: float, noise: float, rng: random.Random) -> float:
    """One batch's time: the mean a + c*b ms with multiplicative log-normal noise of standard
    deviation `noise` (relative) and mean 1, as `bench.profiles.Profile.sample` draws it."""
    mean = (a_ms + c_ms * size) / 1000.0
    return mean * rng.lognormvariate(-noise * noise / 2, noise)


class PeerModel:
    """The model object a peer's handler calls with a batch of instances."""

    def __init__(self) -> None:
        self.a_ms = float(os.environ.get("PEER_A_MS", "20"))
        self.c_ms = float(os.environ.get("PEER_C_MS", "2"))
        self.noise = float(os.environ.get("PEER_NOISE", "0.1"))
        self.rng = random.Random(int(os.environ.get("PEER_SEED", "1")) ^ 0xBACE)
        self.lock = asyncio.Lock()
        path = os.environ.get("PEER_BATCH_LOG")
        self.log = open(path, "a", buffering=1, encoding="ascii") if path else None  # noqa: SIM115

    async def run(self, instances: Sequence[Sequence[Number]]) -> list[list[Number]]:
        """Run one batch (waiting for the batch before it to end) and answer each instance."""
        rows = [list(x) for x in instances]
        async with self.lock:
            started = time.monotonic()
            if self.log is not None:
                self.log.write(f"{started:.6f} {len(rows)}\n")
            await asyncio.sleep(
                batch_seconds(len(rows), self.a_ms, self.c_ms, self.noise, self.rng)
            )
        return [predict(x) for x in rows]

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
