"""Deterministic text, token counting and the prompt identity.

Token-count rule (documented in README.md): a prompt counts one token per match
of ``\\w{1,4}|[^\\w\\s]`` (a run of word characters is split into 4-character
pieces, every other non-space character is a token of its own), and at least 1.
A prompt given as token ids counts one token per id. Chat messages are first
rendered with a fixed template (``render_chat``) and counted with the same rule.

Generated text: token ``i`` of a completion is a word from ``VOCAB`` (one to four
letters, preceded by a space) chosen by ``shake_256(model, prompt key)``; the text
therefore depends only on (model, prompt, position), and re-counting it with the
prompt rule gives exactly the number of generated tokens.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, List, Tuple

_TOKEN_RE = re.compile(r"\w{1,4}|[^\w\s]")

VOCAB: Tuple[str, ...] = tuple(
    """
    the of and to in is it you that he was for on are as with his they at be this from
    have or by one had not but what all were when we can an your if do will each how up
    out them then she many some so like has her two more make see time no way been call
    who its now find long down day did get come made may part over new sub take only map
    work know year live me back give most very our just name good man say help low line
    turn much mean old any same tell boy move why ask went men read need land home us
    hand kind here end play such off air well also form set put does must big even act
    add arc arm art bag bay bed bee bet bid bit box bud bus cab cap car cat cow cry cup
    cut dam den dew dig dog dot dry due ear eat egg elf elk elm era eve eye fan far fat
    fee few fig fin fir fit fix fly fog fox fun fur gap gas gem gum gut guy hat hay hen
    hip hit hog hop hot hub hue hug ice ink inn ion ivy jam jar jaw jet job jog joy keg
    key kid kit lab lad lap law lay leg lid lip log lot mat mix mop mud mug nap net nod
    nut oak oar oat odd oil orb owl own pad pan paw pea pen pet pie
    """.split()
)
assert len(VOCAB) == 256 and len(set(VOCAB)) == 256, len(VOCAB)


def count_tokens(text: str) -> int:
    """Prompt token count of ``text`` (see module docstring)."""
    return max(1, len(_TOKEN_RE.findall(text)))


def render_chat(messages: Iterable[dict]) -> str:
    """The fixed chat template: ``<|role|>\\ncontent\\n`` per message, then the
    generation prompt ``<|assistant|>\\n``."""
    parts: List[str] = []
    for msg in messages:
        parts.append("<|{}|>\n{}\n".format(msg.get("role", ""), content_text(msg.get("content"))))
    parts.append("<|assistant|>\n")
    return "".join(parts)


def content_text(content: Any) -> str:
    """Text of an OpenAI message content: a string, a list of parts or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out: List[str] = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            out.append(str(part.get("text", "")))
        elif isinstance(part, dict):
            out.append("<{}>".format(part.get("type", "part")))
        else:
            out.append(str(part))
    return "\n".join(out)


def prompt_key(kind: str, prompt: Any) -> str:
    """Stable identity (hex) of a prompt. ``kind``: ``text`` (a string, also the
    rendered chat) or ``ids`` (a list of token ids)."""
    if kind == "ids":
        data = b"ids\0" + ",".join(str(int(t)) for t in prompt).encode()
    else:
        data = b"text\0" + str(prompt).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def tokens(model: str, key: str, start: int, count: int) -> List[str]:
    """Generated tokens ``start .. start+count-1`` for (model, prompt key)."""
    if count <= 0:
        return []
    stream = hashlib.shake_256((f"gen\0{model}\0{key}").encode()).digest(start + count)
    return [" " + VOCAB[b] for b in stream[start:]]


def text(model: str, key: str, count: int) -> str:
    """The whole completion of ``count`` tokens."""
    return "".join(tokens(model, key, 0, count))
