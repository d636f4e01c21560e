"""`mlproxy`: run the ext_proc server, the demo model, the local stack, or the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from extproc.main import Settings
    from mlproxy.client import Client

__all__ = ["main"]

log = logging.getLogger("mlproxy")

_T = TypeVar("_T")


def _logging(verbose: bool = False, who: str = "") -> None:
    """Text or JSON lines (--log-format, else MLPROXY_LOG_FORMAT; main() checked it)."""
    from mlproxy_common.logs import ENV_LOG_FORMAT, setup

    fmt = os.environ.get(ENV_LOG_FORMAT) or "text"
    setup(logging.DEBUG if verbose else logging.INFO, fmt, who)


def _add_log_flag(p: argparse.ArgumentParser, again: bool = False) -> None:
    from mlproxy_common.logs import ENV_LOG_FORMAT, FORMATS

    keep: dict[str, Any] = {"default": argparse.SUPPRESS} if again else {"default": None}
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        help=f"text (default) or json: one JSON object per line, with request and batch ids "
        f"({ENV_LOG_FORMAT}); children of `up` and workers inherit it",
        **keep,
    )


def _log_format(flag: str | None) -> str:
    """The log format, checked, and put in the environment for child processes (workers, the
    processes `up` starts). ValueError for an unknown MLPROXY_LOG_FORMAT."""
    from mlproxy_common.logs import ENV_LOG_FORMAT, FORMATS

    fmt = flag or os.environ.get(ENV_LOG_FORMAT) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"{ENV_LOG_FORMAT} must be text or json, not {fmt[:16]!r}")
    os.environ[ENV_LOG_FORMAT] = fmt
    return fmt


def _run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# grpcio's EventEngine listener costs about 17% more CPU per ext_proc stream than the classic
# one on this workload (bench/overhead.py); use the classic one unless the operator chose.
GRPC_EXPERIMENTS_DEFAULT = "-event_engine_listener"


ENV_WORKERS = "MLPROXY_WORKERS"


def _workers(flag: int | None) -> int:
    """--workers, else MLPROXY_WORKERS, else 1."""
    from mlproxy.workers import MAX_WORKERS

    if flag is not None:
        value = flag
    else:
        env = os.environ.get(ENV_WORKERS, "").strip()
        try:
            value = int(env) if env else 1
        except ValueError:
            raise ValueError(f"{ENV_WORKERS} is not a number: {env[:16]!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"--workers must be from 1 to {MAX_WORKERS}, not {value}")
    return value


def cmd_extproc(args: argparse.Namespace) -> int:
    from mlproxy.workers import supervise, worker_slot

    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
    try:
        args.slot = worker_slot()
    except ValueError as err:  # MLPROXY_WORKER_* are the supervisor's to set
        _logging(args.verbose)
        log.error("ext_proc cannot start: %s", err)
        return 2
    _logging(args.verbose, "" if args.slot is None else f"worker-{args.slot.index} ")
    workers = 1
    if args.slot is None:
        try:
            workers = _workers(args.workers)
        except ValueError as err:
            log.error("ext_proc cannot start: %s", err)
            return 2
        if workers > 1 and args.port == 0:
            log.error("--workers shares one gRPC port between the workers: give --port")
            return 2
    # The same checks in a supervisor as in a worker: a configuration no worker can start with
    # fails here, instead of workers restarting forever.
    if not _extproc_security(args):  # TLS files, no password on the command line
        return 2
    endpoint = args.otlp_endpoint or os.environ.get(ENV_OTLP)
    if endpoint:
        from extproc.adapters.tracing import endpoint_problem

        problem = endpoint_problem(endpoint)
        if problem is not None:
            log.error("ext_proc cannot start: %s (--otlp-endpoint, %s)", problem, ENV_OTLP)
            return 2
    if args.policies is not None and args.peers is not None:
        log.error(
            "peering (--peer-port) finds the other replicas in Redis: use --redis-url, "
            "not --policies"
        )
        return 2
    redis_url = args.redis_url or os.environ.get("MLPROXY_REDIS_URL") or os.environ.get("REDIS_URL")
    if args.policies is None and not redis_url:
        log.error("say where policies come from: --policies FILE, or --redis-url / REDIS_URL")
        return 2
    if workers > 1:
        return supervise(
            args.argv, workers, args.host, args.metrics_port, args.grace + args.drain_delay + 5
        )
    from extproc.main import serve

    return _run_async(serve(_extproc_settings(args, redis_url)))


def _extproc_security(args: argparse.Namespace) -> bool:
    from mlproxy_common.redis_auth import (
        RedisCredentialsError,
        password_on_command_line,
        redis_kwargs,
    )
    from mlproxy_common.tls import TlsConfigError, server_files_from_args

    problem = password_on_command_line(args.redis_url)
    if problem:
        log.error("%s", problem)
        return False
    try:
        args.tls = server_files_from_args(args, require_ca=True)
        url = args.redis_url or os.environ.get("MLPROXY_REDIS_URL") or os.environ.get("REDIS_URL")
        if url and args.policies is None:
            redis_kwargs(url)  # the credentials files can be read
    except (TlsConfigError, RedisCredentialsError) as err:
        log.error("ext_proc cannot start: %s", err)
        return False
    try:
        args.stats_window = _stats_window(args.stats_window, os.environ.get(ENV_STATS_WINDOW))
        args.rate_window = _rate_window(args.rate_window, os.environ.get(ENV_RATE_WINDOW))
        args.backend_proxy = _backend_proxy(
            args.backend_proxy or os.environ.get(ENV_BACKEND_PROXY) or None
        )
    except ValueError as err:
        log.error("ext_proc cannot start: %s", err)
        return False
    from extproc.adapters.peers import PeerConfigError, settings_from_env

    try:
        args.peers = settings_from_env(
            args.peer_port,
            args.peer_token_file,
            args.peer_host or args.host,
            args.peer_advertise,
            args.peer_networks,
            args.peer_tls_server_name,
        )
    except PeerConfigError as err:
        log.error("ext_proc cannot start: %s", err)
        return False
    slot = getattr(args, "slot", None)
    if slot is not None and args.peers is not None:  # worker i: its own peer port
        import dataclasses

        args.peers = dataclasses.replace(
            args.peers,
            port=slot.peer_port(args.peers.port),
            advertise=slot.peer_advertise(args.peers.advertise),
        )
    return True


ENV_STATS_WINDOW = "MLPROXY_STATS_WINDOW_S"
ENV_RATE_WINDOW = "MLPROXY_RATE_WINDOW_S"
ENV_BACKEND_PROXY = "MLPROXY_BACKEND_PROXY"
# --rate-window's bounds, in seconds.
MIN_RATE_WINDOW, MAX_RATE_WINDOW = 0.05, 60.0


def _rate_seconds(value: str) -> float:
    """--rate-window: seconds from 0.05 to 60."""
    return _seconds_within(value, MIN_RATE_WINDOW, MAX_RATE_WINDOW)


def _rate_window(flag: float | None, env: str | None) -> float:
    """The arrival-rate window: --rate-window, else MLPROXY_RATE_WINDOW_S, else 2 s."""
    from mlproxy_kernel.batching import RATE_WINDOW

    return _flag_or_env(flag, env, ENV_RATE_WINDOW, _rate_seconds, RATE_WINDOW)


def _flag_or_env(
    flag: float | None, env: str | None, name: str, parse: Callable[[str], float], default: float
) -> float:
    """A flag's value, else its environment variable's (checked as the flag is), else the
    default; ValueError naming the variable if it is out of range."""
    if flag is not None:
        return flag
    if env is None or not env.strip():
        return default
    try:
        return parse(env.strip())
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"{name}: {err}") from None


def _seconds_within(value: str, lo: float, hi: float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not lo <= seconds <= hi:  # also NaN
        raise argparse.ArgumentTypeError(f"not a number of seconds from {lo:g} to {hi:g}: {value}")
    return seconds


def _backend_proxy(url: str | None) -> str | None:
    """--backend-proxy: an http://host:port forward proxy (an Envoy egress listener)."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(
            f"{ENV_BACKEND_PROXY} / --backend-proxy: {url!r} is not http://host:port (an "
            "Envoy listener that forwards the batch calls)"
        )
    return f"http://{parts.netloc}"


def _window_seconds(value: str) -> float:
    """--stats-window: seconds from 1 (the stats' one-second buckets) to 3600."""
    from extproc.core.stats import MAX_WINDOW, MIN_SPAN

    return _seconds_within(value, MIN_SPAN, MAX_WINDOW)


def _stats_window(flag: float | None, env: str | None) -> float:
    """The heartbeat stats window: --stats-window, else MLPROXY_STATS_WINDOW_S, else 60 s."""
    from extproc.core.stats import DEFAULT_WINDOW

    return _flag_or_env(flag, env, ENV_STATS_WINDOW, _window_seconds, DEFAULT_WINDOW)


def _extproc_settings(args: argparse.Namespace, redis_url: str | None) -> Settings:
    """What the flags (and their environment variables) say, for the composition root
    (extproc/main.py); the code's defaults otherwise."""
    from extproc.adapters.wire import HeaderLimits
    from extproc.main import FilePolicies, RedisPolicies, Settings, StreamLimits

    d = StreamLimits()
    limits = StreamLimits(
        HeaderLimits(args.max_headers or d.headers.count, args.max_header_bytes or d.headers.size),
        max_body_bytes=args.max_body_bytes or d.max_body_bytes,
        max_streams=args.max_streams or d.max_streams,
    )
    if args.policies is not None:
        policies: FilePolicies | RedisPolicies = FilePolicies(
            Path(args.policies), args.reload_interval
        )
    else:
        assert redis_url is not None
        policies = RedisPolicies(redis_url, args.advertise or f"{args.host}:{args.port}")
    slot = args.slot
    return Settings(
        policies,
        _replica_id(args),
        host=args.host,
        port=args.port,
        # a worker: on loopback, any port; the supervisor serves --metrics-port
        metrics_port=args.metrics_port if slot is None else (0 if args.metrics_port else None),
        metrics_host=None if slot is None else "127.0.0.1",
        on_metrics=None if slot is None else slot.metrics_served,
        reuse_port=slot is not None,
        limits=limits,
        max_streams_per_connection=args.max_streams_per_connection,
        tls=args.tls,
        peers=args.peers,
        stats_window=args.stats_window,
        rate_window=args.rate_window,
        backend_proxy=args.backend_proxy,
        otlp_endpoint=args.otlp_endpoint or os.environ.get(ENV_OTLP) or None,
        grace=args.grace,
        drain_delay=args.drain_delay,
    )


ENV_OTLP = "MLPROXY_OTLP_ENDPOINT"


def _replica_id(args: argparse.Namespace) -> str:
    """This replica's id: --replica-id, else HOSTNAME, else host-pid. A worker's is its
    supervisor's with its slot: the same across its restarts."""
    import socket

    process = os.getpid() if args.slot is None else os.getppid()
    replica_id = (
        args.replica_id or os.environ.get("HOSTNAME") or f"{socket.gethostname()}-{process}"
    )
    return replica_id if args.slot is None else args.slot.replica_id(replica_id)


def cmd_controlplane(args: argparse.Namespace) -> int:
    from controlplane.main import serve

    _logging(args.verbose)
    return serve(args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)


ENV_TOKEN_FILE = "MLPROXY_TOKEN_FILE"


def _api_client(args: argparse.Namespace) -> Client:
    """The control plane client of `policy`, `replicas` and `store`: --url, else MLPROXY_URL;
    the token from --token, else --token-file, else MLPROXY_TOKEN, else MLPROXY_TOKEN_FILE.
    ValueError if a token file cannot be read or is empty."""
    from mlproxy.client import Client

    token: str | None = args.token
    path = args.token_file if token is None else None
    if token is None and path is None and not os.environ.get("MLPROXY_TOKEN"):
        path = os.environ.get(ENV_TOKEN_FILE) or None
    if path is not None:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read the token file {path}: {err}") from None
        if not token:
            raise ValueError(f"the token file {path} is empty")
    return Client(url=args.url, token=token, ca_file=args.ca_file)


def _add_api_flags(p: argparse.ArgumentParser, again: bool = False) -> None:
    """--ca-file, --url, --token, --token-file; `again` on a sub-action's parser, so that they
    may also follow the action (`mlproxy policy apply --url ...`) without unsetting them."""
    from mlproxy_common.tls import ENV_CA_FILE

    keep: dict[str, Any] = {"default": argparse.SUPPRESS} if again else {}
    p.add_argument(
        "--ca-file", metavar="FILE", help=f"CA for https:// URLs ({ENV_CA_FILE})", **keep
    )
    p.add_argument(
        "--url",
        metavar="URL",
        help="the control plane (MLPROXY_URL; default http://127.0.0.1:8080)",
        **keep,
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        metavar="TOKEN",
        help="bearer token (MLPROXY_TOKEN); on a command line other users of the host can "
        "see it: prefer --token-file",
        **keep,
    )
    token.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"read the bearer token from this file ({ENV_TOKEN_FILE})",
        **keep,
    )


def _add_file_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--file",
        type=Path,
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="YAML/JSON file, a directory of them (*.yaml, *.yml, *.json), - for stdin; "
        "may be repeated",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="also delete the stored policies that no file names",
    )


def _apply_or_diff(client: Client, args: argparse.Namespace) -> int:
    from mlproxy.apply import apply_changes, plan, print_diff, read_sources

    diff = args.action == "diff"
    try:
        sources = read_sources(args.file)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.prune and not sources:
        print(
            "error: the files hold no policy, and --prune would delete every stored policy: "
            "use `mlproxy policy delete NAME` for that",
            file=sys.stderr,
        )
        return 2
    changes = plan(client, sources, prune=args.prune, force=getattr(args, "force", False))
    if diff:
        return print_diff(changes, sys.stdout, sys.stderr)
    return apply_changes(client, changes, args.dry_run, sys.stdout, sys.stderr)


def cmd_policy(args: argparse.Namespace) -> int:
    from mlproxy.client import ApiError, print_policies, print_status

    try:
        client = _api_client(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.action in ("apply", "diff"):
            return _apply_or_diff(client, args)
        if args.action == "get":
            policies = [client.get_policy(args.name)] if args.name else client.list_policies()
            print_policies(policies, args.output, single=args.name is not None)
        elif args.action == "delete":
            client.delete_policy(args.name)
            print(f"policy/{args.name} deleted")
        elif args.action == "status":
            print_status(client.status(args.name), args.output)
    except (ApiError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if args.action == "diff" else 1  # diff: 1 says "there are changes"
    return 0


def cmd_replicas(args: argparse.Namespace) -> int:
    from mlproxy.client import ApiError, print_replicas

    try:
        listing = _api_client(args).replica_listing()
        print_replicas(listing["items"], args.output, listing.get("store"))
    except (ApiError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from mlproxy.client import ApiError, print_store

    try:
        client = _api_client(args)
        print_store(client.publish_store() if args.action == "publish" else client.store())
    except (ApiError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_model(args: argparse.Namespace, rest: list[str]) -> int:
    from mlproxy.demo_model import main as model_main

    model_main(rest)
    return 0


# Long: `mlproxy up`: the stack started, printed and supervised until a signal.
def cmd_up(args: argparse.Namespace) -> int:
    from mlproxy.envoy_config import Upstream
    from mlproxy.stack import Stack, StackError

    _logging(args.verbose)
    upstream = None
    if args.upstream is not None:
        try:
            upstream = Upstream.parse(args.upstream)
        except ValueError as err:
            log.error("%s", err)
            return 2
    try:
        stack = Stack(
            upstream=upstream,
            batch_via_envoy=args.batch_via_envoy,
            envoy_port=args.port,
            policies_file=args.policies,
            replicas=args.replicas,
            controlplane_port=args.controlplane_port,
            model_port=args.model_port,
            redis_url=os.environ.get("REDIS_URL"),
            fail_open=args.fail_open,
            tls=args.tls,
            run_dir=args.run_dir,
        )
    except StackError as err:  # no port could be reserved
        log.error("%s", err)
        return 1
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except StackError as err:
        log.error("%s", err)
        return 1
    print("MLProxy local stack is up:")
    for name, url in stack.endpoints().items():
        print(f"  {name:20} {url}")
    if stack.upstream is None:
        print(
            "Try:\n  curl -s -X POST "
            f"{stack.envoy_url}/v1/models/demo:predict -H 'content-type: application/json' "
            '-d \'{"instances": [[' + ", ".join(["0.5"] * 16) + "]]}'"
        )
    else:
        print(
            f"Every request to {stack.envoy_url} goes to the upstream untouched until a policy "
            "batches its path: `mlproxy policy apply -f policies.yaml` (docs/protocols.md, "
            '"In front of your model server").'
        )
    if stack.uses_redis:
        print("Manage policies with the admin token of this run:")
        print(f"  export MLPROXY_URL={stack.controlplane_url} MLPROXY_TOKEN={stack.admin_token}")
        if stack.pki is not None:
            print(f"  export MLPROXY_CA_FILE={stack.pki.ca}")
        print("  mlproxy policy get; mlproxy replicas")
    print("Ctrl-C stops everything.", flush=True)
    dead = stack.wait(lambda: stopping)
    if dead is not None:
        log.error(
            "%s exited with code %s; stopping the stack. Its log (%s) ends:\n%s",
            dead.name,
            dead.exited(),
            dead.log_path,
            dead.log_tail(),
        )
    stack.stop()
    print("stopped")
    return 1 if dead is not None else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mlproxy.demo import run_demo

    _logging(args.verbose)
    return run_demo(
        requests=args.requests, concurrency=args.concurrency, port=args.port, run_dir=args.run_dir
    )


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {value}")
    return n


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http:// or https:// URL: {value}")
    return value


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from mlproxy.healthcheck import main as healthcheck

    return healthcheck(
        args.grpc,
        args.http,
        args.service,
        args.timeout,
        tls=(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name),
        controlplane=args.controlplane,
    )


def _add_extproc(sub: Any) -> None:
    """`mlproxy extproc` and its flags, in groups as `--help` shows them."""
    from mlproxy_common.tls import add_tls_flags

    p = sub.add_parser("extproc", help="run the ext_proc gRPC server")
    _add_log_flag(p, again=True)
    _add_extproc_serving(p)
    add_tls_flags(p, ca_help="CA of Envoy's client certificates; with cert and key: mTLS")
    _add_extproc_limits(p.add_argument_group("limits"))
    _add_extproc_batching(p.add_argument_group("batching, tracing and the backend"))
    _add_extproc_peers(p.add_argument_group("fleet coordination (one owner per model)"))


def _add_extproc_serving(p: Any) -> None:
    """Where policies come from, where the replica listens, its workers and its shutdown."""
    p.add_argument("--policies", type=Path, help="policy file (YAML or JSON), reloaded on change")
    p.add_argument(
        "--redis-url", help="policies from Redis (default: MLPROXY_REDIS_URL, REDIS_URL)"
    )
    p.add_argument("--replica-id", help="this replica's id (default: HOSTNAME, or host-pid)")
    p.add_argument("--advertise", help="address Envoy reaches this replica at (default host:port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics")
    p.add_argument(
        "--workers",
        type=_positive_int,
        help="ext_proc processes sharing --port (SO_REUSEPORT), each a replica of its own; "
        "--metrics-port serves the metrics of all of them, worker i listens for peers on "
        f"--peer-port+i (docs/operations.md, 'Workers'; {ENV_WORKERS}; default 1)",
    )
    p.add_argument("--grace", type=float, default=10.0, help="shutdown grace, seconds")
    p.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        help="seconds to keep serving after reporting NOT_SERVING on shutdown",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the policy file for changes",
    )


def _add_extproc_limits(p: Any) -> None:
    """What one request and one replica may hold."""
    p.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        help="largest request body this replica receives, whatever a policy allows (413 "
        "above); the gRPC receive limit is this plus 64 KiB (default 4 MiB)",
    )
    p.add_argument(
        "--max-headers",
        type=_positive_int,
        help="most request headers in one request (431 above; default 128)",
    )
    p.add_argument(
        "--max-header-bytes",
        type=_positive_int,
        help="most bytes of request header names and values (431 above; default 64 KiB)",
    )
    p.add_argument(
        "--max-streams",
        type=_positive_int,
        help="requests (ext_proc streams) this replica holds at once; beyond, 503 with "
        "Retry-After (default 8192)",
    )
    p.add_argument(
        "--max-streams-per-connection",
        type=_positive_int,
        help="HTTP/2 streams one gRPC connection may hold; keep Envoy's max_concurrent_streams "
        "for the ext_proc cluster at or below it (default: --max-streams)",
    )
    p.add_argument(
        "--stats-window",
        type=_window_seconds,
        metavar="SECONDS",
        help="the span of the recent stats (arrival rate, SLA misses, batch samples) this "
        "replica's heartbeat reports to the fleet tuner; keep the control plane's "
        f"MLPROXY_TUNER_HOLD_S equal to it ({ENV_STATS_WINDOW}; default 60)",
    )


def _add_extproc_batching(p: Any) -> None:
    """Tracing, the way batch calls go out, and the adaptive rule's arrival rate."""
    p.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export OpenTelemetry spans (a request's, its queue wait's, each batch's) with "
        "OTLP over HTTP to this collector URL, e.g. http://otel-collector:4318/v1/traces "
        f"({ENV_OTLP}; default: no tracing). The batch call carries the batch's traceparent",
    )
    p.add_argument(
        "--backend-proxy",
        metavar="URL",
        default=None,
        help="send every batch call through this HTTP proxy (http://host:port: an Envoy "
        "listener such as `mlproxy up --batch-via-envoy` runs), so that the mesh's retries, "
        f"outlier detection, mTLS and access logs apply to it ({ENV_BACKEND_PROXY}; default: "
        "straight to the policy's backend.url)",
    )
    p.add_argument(
        "--rate-window",
        type=_rate_seconds,
        metavar="SECONDS",
        help="the time constant of the arrival rate the adaptive rule sizes batches on "
        "(exponentially weighted); keep it under a third of the backend autoscaler's shortest "
        f"window ({ENV_RATE_WINDOW}; default 2)",
    )


def _add_extproc_peers(p: Any) -> None:
    """Fleet coordination: the peer port, its secret, and where peers may be."""
    p.add_argument(
        "--peer-port",
        type=int,
        help="fleet coordination: listen for the other replicas on this port and batch each "
        "model on one owner replica (docs/adaptive-batching.md, 'Fleets: one owner per model'; "
        "needs Redis and --peer-token-file; default MLPROXY_PEER_PORT, else off)",
    )
    p.add_argument(
        "--peer-token-file",
        metavar="FILE",
        help="the fleet's shared secret, the same file for every replica (MLPROXY_PEER_TOKEN_FILE)",
    )
    p.add_argument(
        "--peer-networks",
        metavar="CIDR[,CIDR...]",
        help="networks peer addresses may be in; others found in Redis are never contacted "
        "(MLPROXY_PEER_NETWORKS; default loopback only: 127.0.0.0/8,::1/128)",
    )
    p.add_argument(
        "--peer-advertise",
        metavar="IP:PORT",
        help="where the other replicas reach this one's peer port, an IP inside "
        "--peer-networks (MLPROXY_PEER_ADVERTISE; default --peer-host:--peer-port)",
    )
    p.add_argument("--peer-host", help="address the peer port listens on (default --host)")
    p.add_argument(
        "--peer-tls-server-name",
        metavar="NAME",
        help="with --tls-*: the name the other replicas' certificates are checked for "
        "(MLPROXY_PEER_TLS_SERVER_NAME; default: the peer's IP)",
    )


def _add_programs(sub: Any) -> None:
    """`mlproxy model` and `mlproxy bench`: programs with parsers of their own."""
    sub.add_parser(
        "model", help="run the demo model server (see `mlproxy model -h`)", add_help=False
    )
    sub.add_parser(
        "bench",
        help="benchmark the real stack against a serverless emulator (see `mlproxy bench -h`)",
        add_help=False,
    )


def _add_controlplane(sub: Any) -> None:
    """`mlproxy controlplane`."""
    from mlproxy_common.tls import add_tls_flags

    p = sub.add_parser("controlplane", help="run the control plane API (settings from env)")
    _add_log_flag(p, again=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    add_tls_flags(p, ca_help=None)  # HTTPS


def _add_policy(sub: Any) -> None:
    """`mlproxy policy` and its actions."""
    p = sub.add_parser("policy", help="manage policies (MLPROXY_URL, MLPROXY_TOKEN)")
    _add_api_flags(p)
    psub = p.add_subparsers(dest="action", required=True)
    a = psub.add_parser(
        "apply",
        help="create or update the policies in files; unchanged ones are left alone",
        description="Plan first (the server checks each policy without storing it), then "
        "write: create with If-None-Match: *, replace with If-Match on the version read (or "
        "the file's `version:`), so a change made in between is refused, not overwritten.",
    )
    _add_file_flags(a)
    a.add_argument("--dry-run", action="store_true", help="say what would change; write nothing")
    a.add_argument(
        "--force",
        action="store_true",
        help="no If-Match/If-None-Match: overwrite whatever is stored (and ignore `version:`)",
    )
    _add_api_flags(a, again=True)
    a = psub.add_parser(
        "diff",
        help="what apply would change, as a unified diff (exit 0: nothing, 1: changes, 2: error)",
    )
    _add_file_flags(a)
    _add_api_flags(a, again=True)
    a = psub.add_parser("get", help="list policies, or show one")
    a.add_argument("name", nargs="?")
    a.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    _add_api_flags(a, again=True)
    a = psub.add_parser("delete", help="delete a policy")
    a.add_argument("name")
    _add_api_flags(a, again=True)
    a = psub.add_parser("status", help="rollout of a policy across the replicas")
    a.add_argument("name")
    a.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _add_api_flags(a, again=True)


def _add_fleet(sub: Any) -> None:
    """`mlproxy replicas` and `mlproxy store`."""
    p = sub.add_parser("replicas", help="list live ext_proc replicas")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _add_api_flags(p)

    p = sub.add_parser(
        "store",
        help="the policy store's generation; `publish` after re-applying policies from git",
        description="Show the policy store generation (a new one after Redis lost its data), "
        "or publish it: replicas then drop the policies they kept from the lost generation "
        "that were not re-applied.",
    )
    p.add_argument("action", nargs="?", choices=["get", "publish"], default="get")
    _add_api_flags(p)


def _add_up(sub: Any) -> None:
    """`mlproxy up`."""
    p = sub.add_parser("up", help="run the local stack until Ctrl-C")
    _add_log_flag(p, again=True)
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument(
        "--policies",
        type=Path,
        default=None,
        help="policies from this file, without Redis and the control plane "
        "(default: Redis + control plane, with a demo policy)",
    )
    p.add_argument("--replicas", type=int, default=1, help="ext_proc replicas")
    p.add_argument("--controlplane-port", type=int, default=8080)
    p.add_argument("--model-port", type=int, default=8001, help="demo model port")
    p.add_argument(
        "--upstream",
        metavar="URL",
        default=None,
        help="put MLProxy in front of this model server (http[s]://host[:port]): every path "
        "no policy batches goes to it untouched; no demo model or demo policy (add policies "
        "with `mlproxy policy apply`)",
    )
    p.add_argument(
        "--batch-via-envoy",
        action="store_true",
        help="the replicas send their batch calls through a listener of the stack's Envoy "
        "(retries of calls that never reached the model, stats, an access log in the run "
        "directory) instead of straight to the model",
    )
    p.add_argument(
        "--fail-open",
        action="store_true",
        help="when no ext_proc replica answers, Envoy sends requests on to the model itself: "
        "unbatched, unvalidated, and a request may reach the model twice if a replica dies "
        "after sending its batch (default: fail closed, the client gets an error)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="mTLS on every hop, with a throwaway CA and certificates in the run directory",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the run directory: every process's log, the generated configs and the stack's "
        "secrets (created, owner-only, if missing; default: a new one under the system's temp "
        "directory). It is kept after the stack stops, for its logs",
    )


def _add_healthcheck(sub: Any) -> None:
    """`mlproxy healthcheck`."""
    from mlproxy_common.tls import ENV_CA, ENV_CA_FILE, ENV_CERT, ENV_KEY

    p = sub.add_parser(
        "healthcheck",
        help="exit 0 if a gRPC health service answers SERVING, or a URL answers 2xx; else 1",
        description="A container health check: exit 0 if healthy, else 1 with the reason on "
        "stderr.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--grpc", metavar="HOST:PORT", help="ask grpc.health.v1.Health/Check; pass on SERVING"
    )
    target.add_argument("--http", metavar="URL", type=_http_url, help="GET; pass on 2xx")
    target.add_argument(
        "--controlplane",
        metavar="HOST:PORT",
        help=f"GET the control plane's /healthz, over HTTPS if {ENV_CERT} is set (as the "
        f"control plane serves); verified against --tls-ca or {ENV_CA_FILE}, else it must "
        f"present the certificate of {ENV_CERT}",
    )
    p.add_argument("--service", default="", help="gRPC health service name (default: server)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--tls-ca", metavar="FILE", help=f"TLS: CA to verify the server ({ENV_CA})")
    p.add_argument("--tls-cert", metavar="FILE", help=f"gRPC mTLS: client cert ({ENV_CERT})")
    p.add_argument("--tls-key", metavar="FILE", help=f"gRPC mTLS: client key ({ENV_KEY})")
    p.add_argument("--tls-server-name", metavar="NAME", help="name to verify (default: host)")


def _add_demo(sub: Any) -> None:
    """`mlproxy demo` and `mlproxy completion`."""
    p = sub.add_parser("demo", help="start the stack, send a burst, check every answer")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--port", type=int, default=0, help="Envoy listener port (0: any free)")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the run directory, as `up --run-dir` (default: a new one under the system's temp "
        "directory, kept after the demo for its logs)",
    )

    p = sub.add_parser(
        "completion",
        help="print a shell completion script: source <(mlproxy completion bash)",
    )
    p.add_argument("shell", choices=["bash", "zsh"])


def _parser() -> argparse.ArgumentParser:
    """The command line: every command and its flags (completion reads it too)."""

    parser = argparse.ArgumentParser(prog="mlproxy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    _add_log_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_extproc,
        _add_programs,
        _add_controlplane,
        _add_policy,
        _add_fleet,
        _add_up,
        _add_healthcheck,
        _add_demo,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--workers` runs again
    try:
        _log_format(args.log_format)
    except ValueError as err:
        parser.error(str(err))
    if args.command == "model":
        sys.exit(cmd_model(args, rest))
    if args.command == "bench":
        # The benchmark runs the local stack, so it sits above this package (layers:
        # mlproxy_kernel/__init__.py): it is started as a program, not imported.
        import runpy

        sys.argv = ["mlproxy bench", *rest]
        runpy.run_module("bench.real", run_name="__main__", alter_sys=True)
        sys.exit(0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "completion":
        from mlproxy.completion import script

        print(script(parser, args.shell), end="")
        sys.exit(0)
    handlers = {
        "extproc": cmd_extproc,
        "up": cmd_up,
        "demo": cmd_demo,
        "controlplane": cmd_controlplane,
        "policy": cmd_policy,
        "replicas": cmd_replicas,
        "store": cmd_store,
        "healthcheck": cmd_healthcheck,
    }
    sys.exit(handlers[args.command](args))


if __name__ == "__main__":
    main()
