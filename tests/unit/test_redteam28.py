"""Red team 28: the once-a-turn poll of the batching queue (9d9eaa3) and the stack's removal
of a run directory it made (e49fb45)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from extproc.codecs import get_codec
from extproc.runtime.replies import Reply
from mlproxy import stack as stack_module
from mlproxy.stack import Stack, StackError
from tests.fakes import FakeBackend
from tests.unit.test_runtime import Harness, echoed, make_policy

codec = get_codec("kserve-v1")


def _submit(h: Harness, i: int, signature: str) -> asyncio.Future[Reply]:
    """One request of one instance; `signature` is a top-level field, so part of its compat
    key: requests of two signatures go to two batchers of one policy."""
    route = h.router.resolve("/v1/models/m:predict")
    assert route is not None
    fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    body = {"instances": [{"id": i}], "signature_name": signature}
    h.pool.submit(route, codec.parse(json.dumps(body).encode()), fut)
    return fut


# Finding 1 (9d9eaa3, medium): a burst that lands in one turn of the event loop is refused 429
# queue_full although every request in it would have been sent at once. A rule that sends a
# batch that is not full at once (static max_wait_ms 0 here; adaptive `latency` with a free
# slot, a late request) used to send each arrival as it came, so the queue never held more than
# the in-flight limit left waiting. Now nothing is sent before the end of the turn unless one
# batcher holds a full batch: the policy's max_queue is shared by all its batchers (one per
# compat key), so two keys hold up to 2 x (max_batch_size - 1) requests before any poll.
# Fixed (6856330): before it refuses or evicts, the pool runs the polls due at the end of the
# turn, and asks again.
async def test_rt28_a_zero_wait_burst_over_two_compat_keys_is_not_refused_queue_full() -> None:
    h = Harness(make_policy(max_batch_size=8, max_wait_ms=0, max_in_flight=16, max_queue=8))
    futs: list[asyncio.Future[Reply]] = []
    for i in range(5):  # ten requests in one turn, five of each signature
        futs.append(_submit(h, i, "a"))
        futs.append(_submit(h, 100 + i, "b"))  # 9d9eaa3: the ninth is refused queue_full
    replies = await asyncio.wait_for(asyncio.gather(*futs), 5)
    assert [echoed(r) for r in replies] == [[i] for k in range(5) for i in (k, 100 + k)]


async def test_rt28_a_zero_wait_burst_larger_than_max_queue_is_sent_not_refused() -> None:
    """One batcher: max_queue below max_batch_size (a policy that bounds waiting requests
    tightly and sends at once): four free slots, a burst of four, all used to go at once."""
    h = Harness(make_policy(max_batch_size=8, max_wait_ms=0, max_in_flight=4, max_queue=2))
    futs = [_submit(h, i, "a") for i in range(4)]  # 9d9eaa3: the third is refused queue_full
    replies = await asyncio.wait_for(asyncio.gather(*futs), 5)
    assert [echoed(r) for r in replies] == [[i] for i in range(4)]


# Finding 2 (e49fb45, low): `Stack.start` decides whether to remove `run_dir` by a flag set when
# __post_init__ made one, not by the directory it made: a caller that points the stack at its
# own directory after construction (run_dir is a public field, set like `policies_file` is in
# tests/e2e) loses that directory, with everything in it, when the stack fails to start; and
# the temporary directory it did make (with a peer token, if peering) stays behind.
# Fixed (6856330): it removes the path it made, and only that.
def test_rt28_a_run_dir_set_after_construction_is_not_removed_on_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_envoy() -> str:
        raise StackError("envoy not found (red team 28)")

    monkeypatch.setattr(stack_module, "envoy_binary", no_envoy)
    policies = tmp_path / "policies.json"
    policies.write_text("[]")
    stack = Stack(envoy_port=0, policies_file=policies)
    made = stack.run_dir
    mine = tmp_path / "operator-logs"
    mine.mkdir()
    (mine / "keep.txt").write_text("the operator's")
    stack.run_dir = mine
    try:
        with pytest.raises(StackError, match="red team 28"):
            stack.start()
        assert (mine / "keep.txt").read_text() == "the operator's"  # e49fb45: rmtree'd
    finally:
        stack.stop()
        stack.release_ports()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)  # the temporary one it made


# Finding 3 (pre-existing, before 9d9eaa3 too; low): `BatcherPool.drain` waited for each
# batcher's batches in turn, once: a batcher with nothing in flight when its turn comes is
# taken as done, but the batchers of one policy and backend share the in-flight limit, and
# when another's batch ends it sends the request this one still held. drain returns with that
# batch still running (and at shutdown the process goes on to exit with it unanswered).
# Fixed (6856330): drain waits until no batch of any batcher runs.
class _Held(FakeBackend):
    """Holds each batch until the event of its signature is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = {"a": asyncio.Event(), "b": asyncio.Event()}
        self.holding: list[str] = []  # the signatures of the batches it took, in order

    async def post(self, url: str, body: bytes, *args: Any, **kwargs: Any) -> Any:
        signature = "b" if b'"signature_name":"b"' in body else "a"
        self.holding.append(signature)
        await self.release[signature].wait()
        return await super().post(url, body, *args, **kwargs)


async def _turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_rt28_drain_waits_for_a_batch_another_batcher_of_the_group_started() -> None:
    backend = _Held()
    h = Harness(make_policy(max_batch_size=2, max_in_flight=1), backend)  # a minute's wait
    held = _submit(h, 0, "b")  # its batcher first: it waits for the batch to fill
    sent = [_submit(h, i, "a") for i in (1, 2)]  # a full batch: takes the one slot
    await _turns()
    assert backend.holding == ["a"]
    drain = asyncio.ensure_future(h.pool.drain())
    await _turns()  # "b" is flushed but finds no slot; its batcher has no batch running
    backend.release["a"].set()
    await _turns()  # the "a" batch ends; the freed slot sends "b"
    assert all(f.done() for f in sent)
    assert backend.holding == ["a", "b"]
    assert not drain.done()  # drain returned while the "b" batch was still at the backend
    backend.release["b"].set()
    await asyncio.wait_for(drain, 5)
    assert echoed(held.result()) == [0]
