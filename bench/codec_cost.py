"""What the kserve-v1 codec's JSON work costs a request, with orjson as shipped and with the
standard library's json alone, in one run.

    python bench/codec_cost.py [--width 8] [--batch 8] [--number 20000]

extproc/codecs/jsondoc.py reads bodies with json and writes them with orjson wherever it
gives json's exact bytes. This times the codec's three steps on one request shape (an instance
of `--width` floats, an answer of two floats per instance, `--batch` requests a call): parse
(read the request, write its rows back), merge (join a batch) and split (read the answer, write
each request's part), each per request, best of five; then the same with jsondoc's writing done
by json alone (orjson taken off). Both produce the same bytes, which it checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.codecs import jsondoc, kserve_v1
from extproc.codecs.kserve_v1 import KServeV1


@contextmanager
def json_only() -> Iterator[None]:
    """The codec without orjson: every write by the standard library, jsondoc's reference."""
    codec = vars(kserve_v1)  # its `encode` is jsondoc's, imported by name
    shipped = codec["encode"]
    codec["encode"] = jsondoc._encode_json
    try:
        yield
    finally:
        codec["encode"] = shipped


def shapes(width: int, batch: int) -> tuple[bytes, bytes]:
    """A request of one instance of `width` floats, and an answer for `batch` of them."""
    instance = [round(0.1 + i / 7, 6) for i in range(width)]
    request = json.dumps({"instances": [instance]}).encode()
    answer = json.dumps({"predictions": [[0.1234567, 0.7654321]] * batch}).encode()
    return request, answer


def steps(request: bytes, answer: bytes, batch: int) -> dict[str, Callable[[], object]]:
    codec = KServeV1()
    items = [codec.parse(request) for _ in range(batch)]
    return {
        "parse": lambda: codec.parse(request),
        "merge": lambda: codec.merge(items),
        "split": lambda: codec.split(answer, items),
    }


def outputs(request: bytes, answer: bytes, batch: int) -> list[Any]:
    """What the three steps produce: both ways must give the same."""
    return [step() for step in steps(request, answer, batch).values()]


def measure(request: bytes, answer: bytes, batch: int, number: int) -> dict[str, float]:
    """Microseconds per request of each step (merge and split divided by the batch)."""
    per = {"parse": 1, "merge": batch, "split": batch}
    out = {}
    for name, step in steps(request, answer, batch).items():
        best = min(timeit.repeat(step, number=number, repeat=5)) / number
        out[name] = best * 1e6 / per[name]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8, help="floats per instance")
    parser.add_argument("--batch", type=int, default=8, help="requests per backend call")
    parser.add_argument("--number", type=int, default=20_000, help="calls per timing")
    args = parser.parse_args(argv)
    request, answer = shapes(args.width, args.batch)
    shipped = outputs(request, answer, args.batch)
    with json_only():
        if outputs(request, answer, args.batch) != shipped:
            print("json alone gave other bytes than orjson: not comparable", file=sys.stderr)
            return 1
        reference = measure(request, answer, args.batch, args.number)
    fast = measure(request, answer, args.batch, args.number)
    print(f"kserve-v1, {args.width} floats an instance, {args.batch} requests a call")
    print("| us a request | json alone | orjson where it gives json's bytes | ratio |")
    print("|---|---|---|---|")
    for name in ("parse", "merge", "split"):
        ratio = fast[name] / reference[name]
        print(f"| {name} | {reference[name]:.2f} | {fast[name]:.2f} | {ratio:.2f} |")
    total_ref, total_fast = sum(reference.values()), sum(fast.values())
    print(f"| all three | {total_ref:.2f} | {total_fast:.2f} | {total_fast / total_ref:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
