"""Red-team probes of a running stack's policies, through its Envoy: can a client get past them?

    python bench/redteam/policy_probes.py [--envoy http://127.0.0.1:10000] [--policies FILE]

Policies come from FILE (`mlproxy up --policies`, the tests' files) or, without it, from the
control plane (MLPROXY_URL, MLPROXY_TOKEN, MLPROXY_CA_FILE, as the CLI). For each policy:

- `backtracking`: how long matching its `match.path` takes on a 20 KB path built to make its
  variables' lazy groups backtrack (`/{a}-{b}` and `/{a}.{b}` templates, adjacent variables).
  Nothing is sent: the router is the replica's own (`mlproxy_kernel.policy.Router`). Anything
  above a few milliseconds is time one request holds ext_proc's only event loop.
- `encoded-path`: the policy's path (variables filled with `--value`) as it is, and with one
  character percent-encoded (`:` as `%3A`, a letter as `%6D`...), each POSTed through Envoy
  with the demo model's one-instance body. When the plain path is batched
  (`x-mlproxy-batch-size`) and the encoded one gets the same status without it, the request
  went around ext_proc to the model: no batching, no max_body_bytes, no queue, no per-client
  share (BYPASS).

Only loopback addresses are used; each probe sends one request.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlproxy_kernel.policy import Policy, Router, load_policy_file

_VAR = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
PATH_BYTES = 20_000


def hostile_path(template: str) -> str:
    """A path that starts like `template` and fails at its very end, with its first variable
    holding `a-a-a...` (or `a.a.a...`): every split between the variables is tried."""
    first = _VAR.search(template)
    if first is None:
        return template + "!"
    head = template[: first.start()]
    sep = "." if "." in template[first.end() :] and "-" not in template[first.end() :] else "-"
    return head + ("a" + sep) * (PATH_BYTES // 2) + "a!"


def backtracking(policy: Policy) -> float:
    router = Router([policy])
    path = hostile_path(policy.match.path)
    started = time.perf_counter()
    router.resolve(path)
    return time.perf_counter() - started


def encoded_variants(policy: Policy, value: str) -> tuple[str, list[str]]:
    path = _VAR.sub(value, policy.match.path)
    out = []
    if ":" in path:
        i = path.index(":")
        out.append(path[:i] + "%3A" + path[i + 1 :])
    letters = [i for i, c in enumerate(path) if c.isalpha()]
    if letters:
        i = letters[len(letters) // 2]
        out.append(path[:i] + f"%{ord(path[i]):02X}" + path[i + 1 :])
    return path, out


def through_envoy(envoy: str, path: str) -> tuple[int, bool, bytes]:
    """Status, whether MLProxy batched it (x-mlproxy-batch-size), the first bytes."""
    body = json.dumps({"instances": [[0.5] * 16]}).encode()
    req = urllib.request.Request(
        envoy + path, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, headers, data = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, headers, data = err.code, err.headers, err.read()
    return status, "x-mlproxy-batch-size" in {k.lower() for k in headers}, data[:80]


def load(args: argparse.Namespace) -> list[Policy]:
    if args.policies:
        return load_policy_file(args.policies)
    from mlproxy.client import Client

    return [Policy.model_validate(p) for p in Client().list_policies()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envoy", default="http://127.0.0.1:10000")
    parser.add_argument("--policies", help="a policy file (default: the control plane's)")
    parser.add_argument("--value", default="demo", help="what path variables are filled with")
    args = parser.parse_args()
    worst = 0
    for policy in load(args):
        seconds = backtracking(policy)
        flag = "SLOW" if seconds > 0.01 else "ok"
        worst = max(worst, flag == "SLOW")
        print(
            f"{policy.name}: backtracking {seconds * 1000:.1f} ms on a {PATH_BYTES} B path "
            f"({policy.match.path}) {flag}"
        )
        plain, variants = encoded_variants(policy, args.value)
        status, batched, head = through_envoy(args.envoy, plain)
        print(f"{policy.name}: plain-path {plain} -> {status} batched={batched} {head!r}")
        for path in variants:
            code, handled, head = through_envoy(args.envoy, path)
            flag = "BYPASS" if batched and not handled and code == status else "ok"
            worst = max(worst, flag == "BYPASS")
            print(f"{policy.name}: encoded-path {path} -> {code} batched={handled} {flag} {head!r}")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
