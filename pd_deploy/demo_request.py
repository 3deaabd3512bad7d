"""Send one streaming request through the deployed proxy and say how to reach/remove it.

`python -m pd_deploy.demo_request -i INVENTORY` (what `make demo` runs last).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request

from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory


def stream(listen: str, model: str, prompt: str, max_tokens: int, api_key: str | None) -> int:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(f"http://{listen}/v1/completions", data=body, headers=headers)
    started = time.monotonic()
    first = None
    chunks = 0
    with urllib.request.urlopen(req, timeout=60) as resp:
        rid = resp.headers.get("X-Request-Id", "-")
        print(f"POST http://{listen}/v1/completions (stream) -> {resp.status}, request id {rid}")
        sys.stdout.write("  text: ")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                first = first or time.monotonic()
                chunks += 1
                sys.stdout.write(event["choices"][0].get("text", ""))
                sys.stdout.flush()
            if event.get("usage"):
                usage = event["usage"]
    total = time.monotonic() - started
    print(f"\n  {chunks} chunks, first after {((first or started) - started) * 1000:.0f} ms, "
          f"total {total * 1000:.0f} ms, usage {usage if chunks else '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pd_deploy.demo_request")
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--prompt", default="Explain prefill/decode disaggregation in one line:")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    doc = plan_document(*load_inventory(args.inventory))
    proxy = doc["proxy"]
    model = next(s for by in doc["specs"].values() for r, s in by.items() if r == "C")
    key = model["proxy"]["options"].get("api_key")
    rc = stream(proxy["listen"], model["proxy"]["served_model_name"], args.prompt,
                args.max_tokens, key)
    inv = args.inventory
    name = model["proxy"]["served_model_name"]
    door = doc["front_door"]
    behind = (f"{len(proxy['prefill'])} prefill and {len(proxy['decode'])} decode endpoints"
              if door["mode"] == "pd" else f"in front of {doc['engine']}'s router "
              f"{', '.join(door['router'])}")
    print(f"""
The cluster is up: proxy {', '.join(proxy['listens'])}, {behind}.
  try it:   curl -s http://{proxy['listen']}/v1/completions \\
              -H 'Content-Type: application/json' \\
              -d '{{"model": "{name}", "prompt": "hello", "max_tokens": 8}}'
  metrics:  curl -s http://{proxy['listen']}/metrics
  status:   .venv/bin/ansible-playbook -i {inv} status.yml
  logs:     .venv/bin/ansible-playbook -i {inv} logs.yml
  remove:   .venv/bin/ansible-playbook -i {inv} cleanup.yml   (or: make demo-clean \
INVENTORY={inv})""")
    return rc


if __name__ == "__main__":
    sys.exit(main())
