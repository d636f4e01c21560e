"""`mlproxy`: run the ext_proc server, the demo model, the local stack, or the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("mlproxy")


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def _run_async(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


# grpcio's EventEngine listener costs about 17% more CPU per ext_proc stream than the classic
# one on this workload (bench/overhead.py); use the classic one unless the operator chose.
GRPC_EXPERIMENTS_DEFAULT = "-event_engine_listener"


def cmd_extproc(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
    from extproc.server import ExtProcServer, run
    from mlproxy.policy import PolicyFileError, load_policy_file

    _logging(args.verbose)
    try:
        policies = load_policy_file(args.policies)
    except PolicyFileError as err:
        log.error("invalid policy file: %s", err)
        return 2
    server = ExtProcServer(policies, host=args.host, port=args.port, metrics_port=args.metrics_port)
    _run_async(run(server, grace=args.grace))
    return 0


def cmd_model(args: argparse.Namespace, rest: list[str]) -> int:
    from mlproxy.demo_model import main as model_main

    model_main(rest)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from mlproxy.stack import Stack, StackError

    _logging(args.verbose)
    stack = Stack(envoy_port=args.port, policies_file=args.policies)
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
    print(
        "Try:\n  curl -s -X POST "
        f"{stack.envoy_url}/v1/models/demo:predict -H 'content-type: application/json' "
        '-d \'{"instances": [[' + ", ".join(["0.5"] * 16) + "]]}'"
    )
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
    return run_demo(requests=args.requests, concurrency=args.concurrency, port=args.port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlproxy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extproc", help="run the ext_proc gRPC server")
    p.add_argument("--policies", required=True, type=Path, help="policy file (YAML or JSON)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics")
    p.add_argument("--grace", type=float, default=10.0, help="shutdown grace, seconds")
    p.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the policy file for changes",
    )

    sub.add_parser(
        "model", help="run the demo model server (see `mlproxy model -h`)", add_help=False
    )

    p = sub.add_parser("up", help="run Envoy + ext_proc + the demo model until Ctrl-C")
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port")
    p.add_argument(
        "--policies", type=Path, default=None, help="policy file (default: batch the demo model)"
    )

    p = sub.add_parser("demo", help="start the stack, send a burst, check every answer")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--port", type=int, default=0, help="Envoy listener port (0: any free)")

    args, rest = parser.parse_known_args(argv)
    if args.command == "model":
        sys.exit(cmd_model(args, rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"extproc": cmd_extproc, "up": cmd_up, "demo": cmd_demo}
    sys.exit(handlers[args.command](args))


if __name__ == "__main__":
    main()
