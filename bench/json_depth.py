"""What the create body's depth check costs, next to decoding the same body.

The check runs on every create before msgspec decodes the body (see
``service.schemas.json_depth_exceeds``). It prints microseconds per call for a
typical body and for the worst 1 MiB bodies a client can send.

    .venv/bin/python bench/json_depth.py
"""

from __future__ import annotations

import timeit

import msgspec

from service.schemas import json_depth_exceeds, request_decoder

LIMIT = 64
TYPICAL = (
    b'{"task": "sleep", "input": {"seconds": 1, "steps": 3}, "timeout_seconds": 600,'
    b' "metadata": {"team": "payments", "env": "prod"}}'
)
BODIES = {
    "typical create": TYPICAL,
    "1 MiB of balanced [] (worst)": b"[" + b"[]," * 349_000 + b"[]]",
    "1 MiB of [ inside a string": b'["' + b"[" * 1_048_000 + b'"]',
    "1,000 levels deep": b"[" * 1000 + b"]" * 1000,
}


def per_call_us(fn: object, number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6  # type: ignore[arg-type]


def main() -> None:
    print(f"{'body':32} {'bytes':>9} {'depth check µs':>15} {'decode µs':>10}")
    for name, body in BODIES.items():
        number = 100_000 if len(body) < 10_000 else 20
        check = per_call_us(lambda b=body: json_depth_exceeds(b, LIMIT), number)
        if name == "typical create":
            decode = f"{per_call_us(lambda: request_decoder.decode(TYPICAL), number):10.2f}"
        else:
            decode = f"{per_call_us(lambda b=body: _decode_any(b), number):10.0f}"
        print(f"{name:32} {len(body):9} {check:15.2f} {decode}")


def _decode_any(body: bytes) -> object:
    try:
        return msgspec.json.decode(body)
    except RecursionError:
        return None


if __name__ == "__main__":
    main()
