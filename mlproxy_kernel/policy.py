"""Per-model batching policies: the shared contract between control plane and ext_proc.

A policy says which requests it takes (a path template), where their batches go (a backend URL
template), how to read and split them (a codec), the SLA, and how to batch. See docs/policies.md
for every field. Unknown fields and out-of-range values are rejected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "NAME_PATTERN",
    "SLA",
    "Backend",
    "Batching",
    "Match",
    "Mode",
    "Policy",
    "PolicyBody",
    "PolicyFile",
    "PolicyFileError",
    "PolicyWrite",
    "Route",
    "Router",
    "Tuning",
    "choose_among",
    "format_validation_error",
    "load_policy_file",
    "parse_policies",
]

_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_PATTERN = _NAME  # what a policy name is: a DNS label
# What a path variable matches: one segment of letters, digits and `_.~-`, not starting with a
# dot. It is put into the backend URL, so never `..`, and no `%` (an encoded `..` or `/` would
# reach the backend decoded).
# At most 128 characters: with several variables in one segment (`{model}-{version}`) a match is
# ambiguous, and the regex's backtracking must stay bounded on a hostile path.
_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]{0,127}?"
# Longer paths never match a policy (no model route is this long); they pass through.
MAX_MATCHED_PATH = 1024


class _Strict(BaseModel):
    # strict: an int field takes only an integer (not "32", true or 2.0), a float field a
    # number (an integer too), a bool field only true/false; allow_inf_nan: no NaN or infinity.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Match(_Strict):
    """Which requests a policy takes."""

    path: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^/")]
    """Path template, e.g. `/v1/models/{model}:predict`; `{var}` matches up to 128 letters,
    digits and `_.~-` within one path segment, not starting with `.`; at most two variables
    in one segment. The query string is ignored; percent-escapes are decoded before matching;
    paths over 1024 characters match no policy."""
    body: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")],
                Annotated[str, Field(min_length=1, max_length=256)],
            ],
            Field(min_length=1, max_length=8),
        ]
        | None
    ) = Field(default=None, exclude_if=lambda v: v is None)  # unset: not written out
    """Top-level fields the JSON body must have, with these exact string values, e.g.
    `{"model": "bge-small"}` for OpenAI embeddings: among the policies whose path matches, the
    first whose body fields match takes the request (docs/policies.md, "Matching on a body
    field")."""


# Batch calls one keep-alive connection to a backend carries by default
# (`backend.calls_per_connection`; extproc/adapters/http1.py): the last asks the backend to
# close it. An answer that lags one request behind on a connection (red team 18: a single late
# duplicate, then every answer a batch late, with nothing to see at the HTTP level) lasts at
# most this long.
DEFAULT_CALLS_PER_CONNECTION = 32


class Backend(_Strict):
    url: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://")]
    """Where batches go, e.g. `http://model.default.svc/v1/models/{model}:predict`. May use
    the variables of the match path in its path only: never in the host, port or query, so
    clients cannot choose what ext_proc connects to."""
    timeout_ms: Annotated[int, Field(ge=1, le=600_000)] = 5_000
    """Whole batch call, connect to last byte; past it the batch's requests get 504."""
    connect_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 1_000
    """Connecting to the backend; past it the batch's requests get 502."""
    autoscaling_target: Annotated[float, Field(gt=0, le=100_000)] | None = None
    """Set for a backend that autoscales on concurrency (Knative): the concurrent calls per
    instance its autoscaler aims for (Knative: `target` x `target-utilization-percentage`,
    e.g. 1 x 0.7). `adaptive` then sends a batch as soon as it is big enough to need no more
    instances than the biggest batch the deadlines allow, instead of holding it to its
    deadline: on such a backend a longer wait buys nothing. Unset: every wait that makes
    batches bigger is worth it (less work for a server of fixed capacity)."""
    max_response_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 16 * 1024 * 1024
    """Largest backend answer read, counted after decompression; past it the batch's requests
    get 502. Bounds ext_proc's memory per batch in flight."""
    calls_per_connection: Annotated[int, Field(ge=1, le=10_000)] = DEFAULT_CALLS_PER_CONNECTION
    """Batch calls one keep-alive connection carries before it is closed. A backend that once
    sends an answer twice can leave a connection's answers a call behind, which HTTP/1.1
    cannot show (docs/security.md): this bounds how long. 1: a connection per batch, for a
    backend you do not trust."""


class SLA(_Strict):
    latency_ms: Annotated[float, Field(gt=0, le=600_000)] = 1_000
    """End-to-end latency target, measured from arrival at ext_proc."""
    percentile: Annotated[float, Field(ge=50, le=99.999)] = 95

    @property
    def latency_s(self) -> float:
        """`latency_ms` in seconds, as the clocks that hold a request to it count."""
        return self.latency_ms / 1000.0


Mode = Literal["adaptive", "static", "aimd", "off"]


class Batching(_Strict):
    mode: Mode = "static"
    """`adaptive`: SLA-aware (deadlines, learned batch time, see docs/adaptive-batching.md).
    `static`: fixed max batch size and max wait (like KServe's batcher). `aimd`: the
    published MLProxy algorithm, a baseline. `off`: one request per backend call, still through
    ext_proc. The default stays `static` so that a stored policy keeps its meaning across
    upgrades; set `adaptive` explicitly."""
    objective: Literal["cost", "latency"] = "cost"
    """`adaptive` only. `cost`: hold requests as long as their deadlines allow, for the largest
    batches (least backend work). `latency`: also send whenever a batch slot is free."""
    on_late: Literal["best_effort", "shed"] = "best_effort"
    """`adaptive` only: a request whose deadline can no longer be met is sent at once anyway
    (`best_effort`) or answered 503 without calling the backend (`shed`). Either way it
    counts as an SLA miss."""
    max_batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    """Most instances (inputs, not requests) in one backend call. A single request with more
    instances than this goes alone. The bound for every mode (`aimd`'s max_bs); the tuner
    may lower it for `adaptive`, never raise it."""
    max_wait_ms: Annotated[float, Field(ge=0, le=60_000)] = 5
    """`static` only: longest the oldest queued request waits for the batch to fill."""
    aimd_period_s: Annotated[float, Field(gt=0, le=3_600)] = 30
    """`aimd` only: how often it steps the batch size (the paper's 30 s). It decides on the
    last 2/3 of a period and takes backend times from the last two periods."""
    margin_ms: Annotated[float, Field(ge=0, le=600_000)] | None = None
    """`adaptive` only: how long before its deadline a batch is planned to finish. Unset: the
    tuner's value, else 10% of the SLA latency."""
    tune: bool = True
    """`adaptive` only: let the control plane's fleet tuner set `tuning`."""
    max_in_flight: Annotated[int, Field(ge=1, le=1_024)] = 4
    """Batches of this policy (per batching key) running at the backend at once."""
    max_queue: Annotated[int, Field(ge=1, le=1_000_000)] = 4_096
    """Most requests waiting in the queue; beyond it, 429 with Retry-After."""


class Tuning(_Strict):
    """What the control plane's fleet tuner set for an `adaptive` policy, and why. Written by
    the tuner (a client may write it too; a PUT without it drops it until the next round)."""

    max_batch_size: Annotated[int, Field(ge=1, le=65_536)] | None = None
    """Batch bound; the policy's `batching.max_batch_size` still caps it."""
    margin_ms: Annotated[float, Field(ge=0, le=600_000)] | None = None
    seed_base_ms: Annotated[float, Field(ge=0, le=600_000)] | None = None
    """Fleet-wide fit of the batch time t(b) = base + per_item * b at the SLA percentile;
    each replica starts from it and refines it with its own samples."""
    seed_per_item_ms: Annotated[float, Field(ge=0, le=600_000)] | None = None
    replicas: Annotated[int, Field(ge=0, le=100_000)] = 0
    """Replicas reporting when the tuner decided."""
    reason: Annotated[str, Field(max_length=1024)] = ""


class PolicyBody(_Strict):
    """What a client writes: everything but the name and the server-set fields."""

    match: Match
    backend: Backend
    codec: Literal["kserve-v1", "oip-v2", "tfs-columnar", "openai-embeddings"] = "kserve-v1"
    sla: SLA = SLA()
    batching: Batching = Batching()
    tuning: Tuning | None = None
    max_body_bytes: Annotated[int, Field(ge=1, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest request body accepted (413 above). Envoy's own buffer limit applies first."""

    @model_validator(mode="after")
    def _url_vars_come_from_path(self) -> PolicyBody:
        url = self.backend.url
        rest = url.split("://", 1)[1]
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        path_end = re.search(r"[?#]", rest)
        outside_path = authority + (rest[path_end.start() :] if path_end else "")
        if _VAR.search(outside_path) or "{" in authority or "}" in authority:
            raise ValueError(
                "backend.url may use match.path's variables only in its path, not in the "
                "host, port or query: clients must not choose what ext_proc connects to"
            )
        try:
            host = urlsplit(url).hostname
            urlsplit(url).port  # noqa: B018 (raises on a bad port)
        except ValueError as err:
            raise ValueError(f"backend.url has an invalid host or port: {err}") from None
        if not host:
            raise ValueError("backend.url has no host")
        if "@" in authority:
            raise ValueError(
                "backend.url must not carry credentials (they would end up in logs and "
                "metrics); put them in the model service's own auth"
            )
        path_vars = set(_VAR.findall(self.match.path))
        missing = set(_VAR.findall(self.backend.url)) - path_vars
        if missing:
            raise ValueError(
                f"backend.url uses {sorted(missing)}, which match.path {self.match.path!r} "
                "does not define"
            )
        if len(_VAR.findall(self.match.path)) != len(path_vars):
            raise ValueError(f"match.path {self.match.path!r} repeats a variable")
        if any(len(_VAR.findall(segment)) > 2 for segment in self.match.path.split("/")):
            # Matching splits a segment between its variables by trying places: with more than
            # two, a hostile path could keep the matcher busy for seconds.
            raise ValueError(
                f"match.path {self.match.path!r} has more than two variables in one segment"
            )
        return self


PolicyName = Annotated[str, Field(pattern=_NAME, description="DNS-label style, unique")]


class Policy(PolicyBody):
    """A stored policy: the body plus its name, version and timestamps."""

    name: PolicyName
    version: Annotated[int, Field(ge=0)] = 0
    """Monotonic across all changes; set by the control plane (0 for file policies)."""
    created_at: Annotated[datetime | None, Field(strict=False)] = None
    updated_at: Annotated[datetime | None, Field(strict=False)] = None


class PolicyWrite(PolicyBody):
    """A PUT body: the name may be repeated (it must equal the URL's); the server-set fields
    may be present, as in a record read back with GET, and are ignored."""

    name: PolicyName | None = None
    version: int | None = None
    created_at: Annotated[datetime | None, Field(strict=False)] = None
    updated_at: Annotated[datetime | None, Field(strict=False)] = None

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"name", "version", "created_at", "updated_at"})


class PolicyFile(_Strict):
    policies: list[Policy]

    @model_validator(mode="after")
    def _unique_names(self) -> PolicyFile:
        seen: set[str] = set()
        for p in self.policies:
            if p.name in seen:
                raise ValueError(f"policy name {p.name!r} appears more than once")
            seen.add(p.name)
        return self


class PolicyFileError(ValueError):
    """A policy file could not be read or is invalid; the message names file and field."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def parse_policies(data: Any) -> list[Policy]:
    """Validate already-decoded data of the shape `{"policies": [...]}`."""
    try:
        return PolicyFile.model_validate(data).policies
    except ValidationError as err:
        raise PolicyFileError(format_validation_error(err)) from err


def load_policy_file(path: str | Path) -> list[Policy]:
    """Read a YAML or JSON policy file (JSON is YAML); errors name the file and the field."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise PolicyFileError(f"{p}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise PolicyFileError(f"{p}: not UTF-8 text ({err.reason})") from err
    except yaml.YAMLError as err:
        raise PolicyFileError(f"{p}: not valid YAML/JSON: {err}") from err
    try:
        return parse_policies(data)
    except PolicyFileError as err:
        raise PolicyFileError(f"{p}: {err}") from err


def _compile(template: str) -> re.Pattern[str]:
    """Each path segment is an atomic group that must end at a `/` or the end: once a segment
    has matched, the matcher never comes back to try another split of it (variables cannot
    hold a `/`, so no later segment depends on it), and the cost stays one segment's at a
    time, not the product of all of them (a red team finding: four segments of two variables
    each held the event loop 13 s on a 521-character path)."""
    segments = []
    for segment in template.split("/"):
        out = []
        pos = 0
        for m in _VAR.finditer(segment):
            out.append(re.escape(segment[pos : m.start()]))
            out.append(f"(?P<{m.group(1)}>{_SEGMENT})")
            pos = m.end()
        out.append(re.escape(segment[pos:]))
        body = "".join(out)
        segments.append(f"(?>{body}(?=/|\\Z))" if pos else body)
    return re.compile("^" + "/".join(segments) + "\\Z")


@dataclass(frozen=True, slots=True)
class Route:
    """A request path resolved to its policy and its batching key."""

    policy: Policy
    backend_url: str

    @property
    def key(self) -> tuple[str, str]:
        """Requests with the same key may share a batch."""
        return (self.policy.name, self.backend_url)


def _specificity(policy: Policy) -> tuple[int, int, int, str]:
    template = policy.match.path
    body = len(policy.match.body or ())
    return (len(_VAR.findall(template)), -len(_VAR.sub("", template)), -body, policy.name)


class Router:
    """Maps request paths to policies. When several templates match, the most specific wins:
    fewer variables, then more literal characters, then the smaller name."""

    _CACHE_SIZE = 4096
    _CACHEABLE_LENGTH = 256

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self._table: list[tuple[re.Pattern[str], Policy]] = []
        self._cache: dict[str, Route] = {}
        self.replace(policies)

    def replace(self, policies: Iterable[Policy]) -> None:
        self._table = [(_compile(p.match.path), p) for p in sorted(policies, key=_specificity)]
        self._cache = {}
        # Some policy matches on body fields: a request's route is known only with its body.
        self.has_body_rules = any(p.match.body for _, p in self._table)

    @property
    def policies(self) -> Sequence[Policy]:
        return [p for _, p in self._table]

    def resolve(self, path: str) -> Route | None:
        """The route of a request path: the query is ignored, and percent-escapes are decoded
        first, as model servers do before they route (so `/v1/models/demo%3Apredict` cannot
        dodge the policy of `/v1/models/demo:predict`)."""
        normal = _normal(path)
        if normal is None:
            return None
        path = normal
        try:
            return self._cache[path]
        except KeyError:
            pass
        route = self._resolve(path)
        # Only short matched paths are cached: pass-through traffic can bring any number of
        # distinct, long paths, and caching those would only hold memory.
        if route is not None and len(path) <= self._CACHEABLE_LENGTH:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            self._cache[path] = route
        return route

    def _resolve(self, path: str) -> Route | None:
        for pattern, policy in self._table:
            m = pattern.match(path)
            if m is not None:
                return Route(policy, _render(policy.backend.url, m.groupdict()))
        return None

    def candidates(self, path: str) -> list[Route]:
        """Every route whose path template matches, most specific first (with body rules,
        any of them may take the request once its body is known)."""
        normal = _normal(path)
        if normal is None:
            return []
        out = []
        for pattern, policy in self._table:
            m = pattern.match(normal)
            if m is not None:
                out.append(Route(policy, _render(policy.backend.url, m.groupdict())))
        return out

    def choose(self, path: str, body: bytes) -> Route | None:
        """The route of a request once its body is known: the most specific policy whose path
        matches and whose `match.body` fields (if any) the body has, as top-level string
        fields of a JSON object; None if none does (the request goes on untouched)."""
        return choose_among(self.candidates(path), body)


def choose_among(candidates: Iterable[Route], body: bytes) -> Route | None:
    """`Router.choose` over a path's `candidates` (most specific first), already found."""
    fields: dict[str, Any] | None = None
    for route in candidates:
        wanted = route.policy.match.body
        if wanted:
            if fields is None:  # read once, and only if a body rule asks
                fields = _top_level(body)
            if any(fields.get(k) != v for k, v in wanted.items()):
                continue
        return route
    return None


def _normal(path: str) -> str | None:
    """A request path as policies match it: without query and fragment, percent-escapes
    decoded; None if it is too long to match any."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if "%" in path:
        path = unquote(path, errors="replace")
    return None if len(path) > MAX_MATCHED_PATH else path


def _top_level(body: bytes) -> dict[str, Any]:
    """A JSON object body's top-level fields ({} for anything else: such a body meets no
    policy's body fields, and its own codec says what is wrong with it)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _render(template: str, values: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: values[m.group(1)], template)
