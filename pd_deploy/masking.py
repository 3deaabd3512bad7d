"""One masker for everything pd-deploy prints: plan text/JSON, the validate summary,
status output. A value is secret when the flag, env variable or option that carries
it names a key, token, secret, password or credential (`--api-key`, `--hf-token`,
`--scheduler-password`, `HF_TOKEN`, `api_key`, ...).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

MASK = "***"
# whole words of a name split at - _ . (so --max-num-batched-tokens and
# --tokenizer_path are not secrets, --hf-token and HF_TOKEN are)
SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd",
                          "credential", "credentials"})
_SPLIT = re.compile(r"[-_.]+")


def is_secret_name(name: str) -> bool:
    """True for a flag, env or option name that carries a secret."""
    return any(w.lower() in SECRET_WORDS for w in _SPLIT.split(name.lstrip("-")) if w)


def mask_argv(argv: list[str]) -> list[str]:
    """argv with the value of every secret flag replaced (`--f V` and `--f=V`)."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append(MASK)
            hide = False
            continue
        if arg.startswith("-") and "=" in arg:
            flag, _ = arg.split("=", 1)
            out.append(f"{flag}={MASK}" if is_secret_name(flag) else arg)
            continue
        out.append(arg)
        hide = arg.startswith("-") and len(arg) > 1 and is_secret_name(arg)
    return out


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in env.items()}


def mask_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in options.items()}
