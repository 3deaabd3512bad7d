"""GET a URL that answers a JSON object and check integer fields of it.

    python -m pd_launcher.http_check --url URL [--expect 'KEY OP N' ...] [--timeout S]

OP is one of >=, >, ==, <= and N an integer, e.g. ``--expect 'prefill>=1'``. The
cluster-ready gate of FastDeploy's router: ``GET /registered_number`` answers
``{"mixed": n, "prefill": n, "decode": n}``.

Output: one line per expectation, then the JSON on one line:

    ok: prefill=1 (>= 1)
    missing: decode=0 (needs >= 1)
    {"mixed": 0, "prefill": 1, "decode": 0}

A key that is absent or not a number fails its expectation. Requests never go through
a proxy (http_proxy / https_proxy are ignored: the URL is cluster-internal).

Exit codes: 0 every expectation holds, 1 some do not, 2 the URL is unreachable,
answers an HTTP error or something that is not a JSON object, or bad arguments (the
message names the URL).
"""
from __future__ import annotations

import argparse
import http.client
import json
import operator
import re
import sys
import urllib.error
import urllib.request
from typing import Any, Callable
from urllib.parse import urlsplit

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_ERROR = 2
MAX_BODY = 1 << 20

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, ">": operator.gt, "==": operator.eq, "<=": operator.le,
}
_EXPECT = re.compile(r"^\s*(?P<key>[^\s<>=]+)\s*(?P<op>>=|<=|==|>)\s*(?P<num>[+-]?\d+)\s*$")


class CheckError(Exception):
    """The URL could not be read as a JSON object; the message names the URL."""


def parse_expect(text: str) -> tuple[str, str, int]:
    """``'prefill>=1'`` -> ("prefill", ">=", 1); ValueError for anything else."""
    m = _EXPECT.match(text)
    if not m:
        raise ValueError(f"expected KEY OP N with OP one of {', '.join(OPS)}, got {text!r}")
    return m.group("key"), m.group("op"), int(m.group("num"))


def _expect_arg(text: str) -> tuple[str, str, int]:
    try:
        return parse_expect(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check(data: dict[str, Any], expect: list[tuple[str, str, int]]) -> list[tuple[bool, str]]:
    """[(holds, line)] for each expectation against the JSON object `data`."""
    out: list[tuple[bool, str]] = []
    for key, op, num in expect:
        value = data.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        holds = number and OPS[op](value, num)
        shown = "absent" if key not in data else json.dumps(value)
        if holds:
            out.append((True, f"ok: {key}={shown} ({op} {num})"))
        else:
            out.append((False, f"missing: {key}={shown} (needs {op} {num})"))
    return out


def fetch_json(url: str, timeout: float) -> dict[str, Any]:
    """GET `url` without any proxy and decode its JSON object; CheckError otherwise."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            body = resp.read(MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        raise CheckError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc  # URLError carries the cause
        raise CheckError(f"cannot reach {url}: {reason}") from None
    if len(body) > MAX_BODY:
        raise CheckError(f"{url} answered more than {MAX_BODY} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        text = " ".join(body.decode("utf-8", "replace").split())[:120]
        raise CheckError(f"{url} did not answer JSON: {text!r}") from None
    if not isinstance(data, dict):
        raise CheckError(f"{url} answered JSON that is not an object: {json.dumps(data)[:120]}")
    return data


def _positive(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not val > 0 or val == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pd_launcher.http_check",
        description="GET a JSON object and check integer fields of it.")
    p.add_argument("--url", required=True, help="http(s) URL answering a JSON object")
    p.add_argument("--expect", type=_expect_arg, action="append", default=[],
                   metavar="KEY>=N", help="an expectation: KEY OP N, OP one of "
                   f"{', '.join(OPS)} (repeatable)")
    p.add_argument("--timeout", type=_positive, default=5.0, metavar="S",
                   help="seconds for the request (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url: str = args.url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        sys.stderr.write(f"http_check: bad --url {url!r}: expected http(s)://HOST:PORT/PATH\n")
        return EXIT_ERROR
    try:
        data = fetch_json(url, args.timeout)
    except CheckError as exc:
        sys.stderr.write(f"http_check: {exc}\n")
        return EXIT_ERROR
    results = check(data, args.expect)
    for _, line in results:
        sys.stdout.write(line + "\n")
    sys.stdout.write(json.dumps(data) + "\n")
    return EXIT_OK if all(ok for ok, _ in results) else EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
