"""List the keys under a prefix in etcd and say which expected keys are missing.

    python -m pd_launcher.etcd_keys --endpoint ENDPOINT --prefix PREFIX
                                    [--expect LABEL=KEY ...] [--json] [--timeout S]

Text output (short, for humans): a header line, one line per key under PREFIX (the
key, then the first 120 characters of its value), then one line per --expect:

    2 key(s) under '/demo/' in etcd http://10.0.0.9:2379
    /demo/XLLM:PREFILL:127.0.1.1:7100  {"name":"127.0.1.1:7100","rpc_address":...
    /demo/XLLM:SERVICE:MASTER  127.0.1.1:9889
    present: P1 (/demo/XLLM:PREFILL:127.0.1.1:7100)
    missing: D1 (/demo/XLLM:DECODE:127.0.1.2:7200 not in etcd)

--json prints {"keys": {key: full value}, "missing": [labels], "present": [labels]}.
KEY is a whole key; one outside PREFIX is looked up on its own.

Exit codes: 0 every expected key is present, 1 some are missing, 2 etcd unreachable
(the message names the endpoint) or bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pd_launcher.etcd_gateway import EtcdError, EtcdGateway

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_ERROR = 2
VALUE_CHARS = 120


def _expect(text: str) -> tuple[str, str]:
    label, sep, key = text.partition("=")
    if not sep or not label.strip() or not key:
        raise argparse.ArgumentTypeError(f"expected LABEL=KEY, got {text!r}")
    return label.strip(), key


def _positive(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if val <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return val


def collect(gw: EtcdGateway, prefix: str, expect: list[tuple[str, str]]) -> dict[str, Any]:
    """{"keys": {key: value} under prefix, "missing": [labels], "present": [labels]}.

    Raises EtcdError when etcd cannot be asked.
    """
    keys = gw.range_prefix(prefix)
    present: list[str] = []
    missing: list[str] = []
    for label, key in expect:
        found = key in keys if key.startswith(prefix) else gw.get(key) is not None
        (present if found else missing).append(label)
    return {"keys": keys, "missing": missing, "present": present}


def short_value(value: str, limit: int = VALUE_CHARS) -> str:
    """A value on one line, cut to `limit` characters ("..." marks a cut)."""
    flat = " ".join(value.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def format_text(result: dict[str, Any], endpoint: str, prefix: str,
                expect: list[tuple[str, str]]) -> str:
    keys: dict[str, str] = result["keys"]
    lines = [f"{len(keys)} key(s) under {prefix!r} in etcd {endpoint}"]
    lines += [f"{key}  {short_value(value)}".rstrip() for key, value in keys.items()]
    missing = set(result["missing"])
    for label, key in expect:
        if label in missing:
            lines.append(f"missing: {label} ({key} not in etcd)")
        else:
            lines.append(f"present: {label} ({key})")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pd_launcher.etcd_keys",
        description="List the keys under PREFIX in etcd; say which expected keys are missing.")
    p.add_argument("--endpoint", required=True, help="etcd client URL: http://IP:PORT or IP:PORT")
    p.add_argument("--prefix", required=True, help="key prefix to list ('' lists every key)")
    p.add_argument("--expect", type=_expect, action="extend", nargs="+", default=[],
                   metavar="LABEL=KEY", help="a key that must exist, reported by LABEL")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--timeout", type=_positive, default=3.0,
                   help="seconds per etcd request (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    expect: list[tuple[str, str]] = args.expect
    labels = [label for label, _ in expect]
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        sys.stderr.write(f"etcd_keys: duplicate --expect label(s): {', '.join(dup)}\n")
        return EXIT_ERROR
    try:
        gw = EtcdGateway(args.endpoint, timeout=args.timeout)
        result = collect(gw, args.prefix, expect)
    except EtcdError as exc:
        sys.stderr.write(f"etcd_keys: {exc}\n")
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        sys.stdout.write(format_text(result, gw.endpoint, args.prefix, expect))
    return EXIT_MISSING if result["missing"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
