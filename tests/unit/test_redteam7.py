"""Red team 7, pure part: the backlog rule (da63825) against another client's requests.

A client that sends a few requests of many instances each (each well under the batch bound)
trips the backlog rule (more queued than a full batch), which plans the next batch at the
largest size the SLA allows; a small request that a short batch would still deliver counts
as late against that size, gives way, and waits behind the big late request that the batch
has no room for. Kept as an expected failure until the rule tells the two apart (docs/security.md,
Known gaps)."""

from __future__ import annotations

import random

import pytest

from tests.unit.test_rules import _poisson, _server_rule, _simulate


@pytest.mark.xfail(
    strict=True,
    reason="red team 7: three requests of 40 instances a second from one client make 3.1% "
    "of another client's 50 req/s miss (0.2% before the backlog rule, da63825): its small "
    "requests count as late against the backlog batch's size and wait behind the big late "
    "one; keeping the smallest batch at one undoes the backlog rule (88% misses in "
    "test_redteam6), skipping the big late one halves it only (docs/security.md, Known gaps)",
)
def test_a_few_big_requests_do_not_make_another_clients_requests_miss() -> None:
    """The production rule (the backend's time known, batches of up to 64, one in flight,
    15 ms margin) in front of a one-worker server; a client at 50 req/s of one instance each,
    another sending three requests of 40 instances each second."""
    missed = []
    for seed in range(1, 4):
        victim = _poisson(50.0, 10.0, random.Random(seed))
        big = [(float(s), 0.150, 40) for s in range(1, 10) for _ in range(3)]
        run = _simulate(_server_rule(), victim, big)
        times = {t for t, _ in victim}
        mine = [r for r in run.requests if r.arrival in times]
        missed.append(sum(not r.met for r in mine) / len(mine))
    assert max(missed) <= 0.01, missed
