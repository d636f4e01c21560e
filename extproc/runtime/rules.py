"""What each batching key's dispatch rule and arrival rate learnt, kept across its batchers.

A batcher goes away when it has nothing queued or running; its rule (the adaptive estimator,
the aimd batch size) and its rate meter stay here, per key, for the next one. The rules
themselves are the kernel's (mlproxy_kernel/rules.py: `rule_for`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping

from extproc.runtime.keys import BatchKey
from mlproxy_kernel.batching import RATE_WINDOW, RateMeter, Rule
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.rules import AdaptiveRule, rule_for

__all__ = ["KEPT", "RuleStore", "fresh_rule", "rule_for"]

# Keys whose rule and rate are kept: the most recently used.
KEPT = 1024


def fresh_rule(policy: Policy, failed: Rule) -> Rule:
    """A new rule for `policy` in place of one that failed: without what it learnt, but within
    the fleet bound it had (the signed members)."""
    fresh = rule_for(policy)
    if isinstance(fresh, AdaptiveRule) and isinstance(failed, AdaptiveRule):
        fresh.bound_fleet(failed.fleet_bound)
    return fresh


class RuleStore(Mapping[BatchKey, tuple[Policy, Rule]]):
    """The rule and the rate meter of each batching key (the most recently used `KEPT`), and
    the fleet bound every adaptive rule is held to. As a mapping: each key's rule, with the
    policy version it was built for."""

    def __init__(self, rate_window: float = RATE_WINDOW) -> None:
        self.rate_window = rate_window  # seconds the queues average the arrival rate over
        self._rules: OrderedDict[BatchKey, tuple[Policy, Rule]] = OrderedDict()
        self._meters: OrderedDict[BatchKey, RateMeter] = OrderedDict()
        # The signed fleet members when this replica is peered (None: not peered): at most
        # that many replicas share a backend, whatever the tuner counted (`bound_fleet`).
        self.fleet_bound: int | None = None

    def __getitem__(self, key: BatchKey) -> tuple[Policy, Rule]:
        return self._rules[key]

    def __iter__(self) -> Iterator[BatchKey]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def rule(self, key: BatchKey, policy: Policy, current: Rule | None = None) -> Rule:
        """The rule for a batching key under `policy`, built from what was learnt before (kept
        here, or the `current` rule of a live batcher whose entry was forgotten)."""
        kept = self._rules.pop(key, None)
        if kept is not None and kept[0] is policy:
            rule = kept[1]
        else:
            rule = rule_for(policy, kept[1] if kept is not None else current)
            if isinstance(rule, AdaptiveRule):
                rule.bound_fleet(self.fleet_bound)
        self._rules[key] = (policy, rule)
        if len(self._rules) > KEPT:
            self._rules.popitem(last=False)
        return rule

    def meter(self, key: BatchKey) -> RateMeter:
        """The arrival rate of a batching key, kept across its batchers."""
        meter = self._meters.pop(key, None)
        if meter is None:
            meter = RateMeter(self.rate_window)
        self._meters[key] = meter
        if len(self._meters) > KEPT:
            self._meters.popitem(last=False)
        return meter

    def used(self, key: BatchKey) -> None:
        """A live batcher's key is in use: the last to be forgotten."""
        if key in self._rules:
            self._rules.move_to_end(key)

    def bound_fleet(self, members: int | None, live: Iterable[Rule] = ()) -> None:
        """The fleet's signed members changed (peering): bound every adaptive rule's fleet,
        those kept here and the `live` batchers' rules."""
        self.fleet_bound = members
        for rule in [*(rule for _, rule in self._rules.values()), *live]:
            if isinstance(rule, AdaptiveRule):
                rule.bound_fleet(members)

    def keep_only(self, policies: Iterable[str]) -> None:
        """Forget the rules of policies no longer applied."""
        names = set(policies)
        for key, (old, _) in list(self._rules.items()):
            if old.name not in names:
                del self._rules[key]
