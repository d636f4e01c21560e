"""`mlproxy policy apply` and `mlproxy policy diff`: policies kept in files (git), applied as
kubectl applies manifests.

The files are read first, all of them; then the plan: for each policy in them the server is
asked what it would store (`PUT ...?dry_run=true`, every check of a real write), and that is
compared with what it stores now. Only then does anything change:

- a policy that is not stored is created with `If-None-Match: *`, one that differs is
  replaced with `If-Match` on the version read for the plan (or on the `version` the file
  carries, as `policy get -o yaml` writes it), so a write that landed in between is refused
  (412), never overwritten; `--force` sends no precondition;
- a policy equal to the stored one is left alone (`unchanged`): no write, no new version, no
  rollout, the fleet tuner's `tuning` kept;
- with `--prune`, a stored policy that no file names is deleted, with `If-Match` too.

`tuning` is the fleet tuner's: it is compared only when a file sets it.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml

from mlproxy.client import ApiError, Client
from mlproxy_kernel.policy import NAME_PATTERN

__all__ = [
    "Change",
    "Source",
    "apply_changes",
    "comparable",
    "plan",
    "print_diff",
    "read_sources",
]

SERVER_SET = ("name", "version", "created_at", "updated_at")
SUFFIXES = (".yaml", ".yml", ".json")

Action = Literal["create", "update", "unchanged", "prune", "error"]


@dataclass(frozen=True)
class Source:
    """One policy as a file gives it."""

    name: str
    doc: dict[str, Any]
    origin: str  # the file it came from ("-": standard input)


@dataclass(frozen=True)
class Change:
    """What apply does to one policy, decided by plan()."""

    name: str
    action: Action
    origin: str  # the file, or "live" for a policy only the server has
    live: dict[str, Any] | None = None  # comparable(): what is stored now
    desired: dict[str, Any] | None = None  # comparable(): what the write would store
    body: dict[str, Any] | None = None  # what to PUT
    headers: tuple[tuple[str, str], ...] = ()  # its preconditions
    live_version: int | None = None
    error: str = ""


# A policy file is small (the control plane takes a policy body of 64 KiB by default): a larger
# one is refused before it is parsed.
MAX_FILE_BYTES = 4 * 1024 * 1024
_NAME = re.compile(NAME_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """A file name or path as printed: control characters (terminal escapes) escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _StrictLoader(yaml.SafeLoader):
    """YAML as a policy file needs it: no aliases (a few hundred bytes of them expand to
    gigabytes), no duplicate keys (the last would silently win, as in a hidden second
    `backend:`)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "YAML aliases (*name) are not allowed in a policy file",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _files(path: Path) -> list[Path]:
    """The file, or a directory's policy files. Every entry of the directory with a policy
    suffix (any case) must be a regular file inside the directory: a dangling or outward
    symlink, or a directory named like a file, is an error, never skipped (with --prune, a
    skipped file's policies would be deleted)."""
    if str(path) == "-" or not path.is_dir():
        return [path]
    root = path.resolve()
    found = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or entry.suffix.lower() not in SUFFIXES:
            continue
        target = entry.resolve()
        if not target.is_file():
            raise ValueError(f"{shown(str(entry))}: not a readable regular file")
        if root not in target.parents:
            raise ValueError(
                f"{shown(str(entry))}: a link out of {shown(str(path))}; copy the file in"
            )
        found.append(entry)
    return found


def _parse(text: str, where: str) -> list[Any]:
    try:
        return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.MarkedYAMLError as err:
        # The problem and its place, never the line's text (a wrong file may hold secrets).
        mark = err.problem_mark or err.context_mark
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(
            f"{where}: not YAML or JSON: {err.problem or err.context}{place}"
        ) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not YAML or JSON ({type(err).__name__})") from None


def _text(path: Path, where: str) -> str:
    """The file's text (standard input for `-`), at most MAX_FILE_BYTES."""
    try:
        if str(path) == "-":
            text = sys.stdin.read(MAX_FILE_BYTES + 1)
        elif path.stat().st_size > MAX_FILE_BYTES:
            text = "x" * (MAX_FILE_BYTES + 1)  # refused below, unread
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {where}: {type(err).__name__}") from None
    if len(text) > MAX_FILE_BYTES:
        raise ValueError(f"{where}: larger than {MAX_FILE_BYTES} bytes")
    return text


def _check(doc: Any, where: str) -> dict[str, Any]:
    """One policy document, as the server would take it: a name, and only JSON values."""
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise ValueError(f"{where}: every policy needs a name")
    if not _NAME.fullmatch(doc["name"]):
        raise ValueError(
            f"{where}: {shown(repr(doc['name']))} is not a policy name (lower-case letters, "
            "digits and '-', as a DNS label)"
        )
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: policy {doc['name']} holds a value JSON cannot carry ({err}): "
            "dates, binary and NaN are no policy field's"
        ) from None
    return doc


def _documents(path: Path) -> list[dict[str, Any]]:
    where = shown(str(path))
    out: list[Any] = []
    for doc in _parse(_text(path, where), where):
        if isinstance(doc, dict) and "policies" in doc:
            if not isinstance(doc["policies"], list):
                raise ValueError(f"{where}: `policies` must be a list")
            out.extend(doc["policies"])
        elif isinstance(doc, list):  # `policy get -o yaml` of several
            out.extend(doc)
        else:
            out.append(doc)
    return [_check(doc, where) for doc in out]


def read_sources(paths: Sequence[Path]) -> list[Source]:
    """Every policy in the files (a directory: its *.yaml, *.yml and *.json, not its
    subdirectories), in order. ValueError for a file that cannot be read or parsed, a policy
    without a name, or a name given twice."""
    sources: list[Source] = []
    seen: dict[str, str] = {}
    for path in paths:
        if str(path) != "-" and not path.exists():
            raise ValueError(f"{shown(str(path))}: no such file or directory")
        for file in _files(path):
            for doc in _documents(file):
                name = doc["name"]
                if name in seen:
                    raise ValueError(
                        f"policy {name!r} is in {seen[name]} and again in {shown(str(file))}: "
                        "each policy must be named once"
                    )
                seen[name] = shown(str(file))
                sources.append(Source(name, doc, shown(str(file))))
    return sources


def comparable(policy: Mapping[str, Any], tuning: bool) -> dict[str, Any]:
    """A stored policy without the server-set fields (and without `tuning` unless `tuning`)."""
    drop = set(SERVER_SET) | (set() if tuning else {"tuning"})
    return {k: v for k, v in policy.items() if k not in drop}


def _file_version(doc: Mapping[str, Any]) -> int | None:
    version = doc.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _plan_one(
    client: Client, source: Source, current: Mapping[str, Any] | None, force: bool
) -> Change:
    name, origin = source.name, source.origin
    try:
        would = client.put_policy(name, source.doc, dry_run=True)
    except (ApiError, ValueError) as err:
        return Change(name, "error", origin, error=str(err))
    tuning = source.doc.get("tuning") is not None
    desired = comparable(would, tuning)
    now = None if current is None else comparable(current, tuning)
    live_version = None if current is None else int(current["version"])
    if now == desired:
        return Change(name, "unchanged", origin, now, desired, live_version=live_version)
    file_version = _file_version(source.doc)
    expect = live_version if file_version is None else file_version
    headers: tuple[tuple[str, str], ...] = ()
    if not force:
        if expect != live_version:
            have = "is not stored" if current is None else f"is at version {live_version}"
            return Change(
                name,
                "error",
                origin,
                now,
                desired,
                live_version=live_version,
                error=f"{origin} was read at version {expect} and the policy {have} now: "
                f"`mlproxy policy diff -f {origin}` shows what changed; remove `version:` "
                "from the file to apply it over that, or --force",
            )
        headers = (("If-None-Match", "*"),) if expect is None else (("If-Match", f'"{expect}"'),)
    action: Action = "create" if current is None else "update"
    return Change(name, action, origin, now, desired, source.doc, headers, live_version)


def plan(client: Client, sources: Iterable[Source], prune: bool, force: bool) -> list[Change]:
    """What apply would do, asking the server (dry runs) but writing nothing."""
    sources = list(sources)
    live = {p["name"]: p for p in client.list_policies()}
    changes = [_plan_one(client, s, live.get(s.name), force) for s in sources]
    if prune:
        named = {s.name for s in sources}
        for name in sorted(live.keys() - named):
            version = int(live[name]["version"])
            headers = () if force else (("If-Match", f'"{version}"'),)
            changes.append(
                Change(
                    name,
                    "prune",
                    "live",
                    live=comparable(live[name], True),
                    headers=headers,
                    live_version=version,
                )
            )
    return changes


PAST = {"create": "created", "update": "configured", "unchanged": "unchanged", "prune": "pruned"}


def apply_changes(
    client: Client, changes: Sequence[Change], dry_run: bool, out: TextIO, err: TextIO
) -> int:
    """Carry out the plan (or, with `dry_run`, say what it would do); one line per policy, as
    kubectl prints. 1 if any policy failed, else 0."""
    failed = 0
    for change in changes:
        label = f"policy/{change.name}"
        if change.action == "error":
            failed += 1
            print(f"{label} not applied: {change.error}", file=err)
            continue
        if dry_run or change.action == "unchanged":
            suffix = " (dry run)" if dry_run and change.action != "unchanged" else ""
            print(f"{label} {PAST[change.action]}{suffix}", file=out)
            continue
        try:
            if change.action == "prune":
                client.delete_policy(change.name, dict(change.headers))
                print(f"{label} pruned", file=out)
                continue
            assert change.body is not None
            stored = client.put_policy(change.name, change.body, headers=dict(change.headers))
        except (ApiError, ValueError) as error:
            failed += 1
            hint = ""
            if isinstance(error, ApiError) and error.status == 412:
                hint = " (it changed after the plan was read: run the command again)"
            print(f"{label} not applied: {error}{hint}", file=err)
            continue
        print(f"{label} {PAST[change.action]} (version {stored['version']})", file=out)
    return 1 if failed else 0


def _yaml(doc: Mapping[str, Any] | None) -> list[str]:
    if doc is None:
        return []
    return yaml.safe_dump(dict(doc), sort_keys=False).splitlines(keepends=True)


def print_diff(changes: Sequence[Change], out: TextIO, err: TextIO) -> int:
    """A unified diff per policy that would change (live, then the files'); 0 if none would,
    1 if some would, 2 if a policy could not be planned (its error on `err`)."""
    differs = False
    failed = False
    for change in changes:
        if change.action == "error":
            failed = True
            print(f"policy/{change.name}: {change.error}", file=err)
        if change.action == "unchanged" or (change.action == "error" and change.desired is None):
            continue  # nothing to show (the server refused it before any plan)
        live = (
            "/dev/null"
            if change.live is None
            else f"policy/{change.name} (live, version {change.live_version})"
        )
        want = "/dev/null" if change.desired is None else f"policy/{change.name} ({change.origin})"
        lines = list(difflib.unified_diff(_yaml(change.live), _yaml(change.desired), live, want))
        if lines:
            differs = True
            out.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
    return 2 if failed else 1 if differs else 0
