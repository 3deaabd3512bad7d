"""OpenAI request validation and response bodies, shaped like vLLM's."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from . import textgen

_ERROR_TYPES = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> Dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


@dataclass
class Parsed:
    chat: bool
    model: str
    key: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    kv_params: Optional[Dict[str, Any]]


def _int_field(body: Dict[str, Any], name: str, minimum: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer", name)
    if value < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}, got {value}.", name)
    return value


def _prompt(body: Dict[str, Any]) -> tuple:
    """(key, prompt tokens) of a completions prompt."""
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "prompt: Field required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return textgen.prompt_key("text", prompt), textgen.count_tokens(prompt)
    if isinstance(prompt, list) and prompt:
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
            if isinstance(prompt, str):
                return textgen.prompt_key("text", prompt), textgen.count_tokens(prompt)
        elif all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
            raise ApiError(400, f"the emulator serves one prompt per request, got {len(prompt)}",
                           "prompt")
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return textgen.prompt_key("ids", prompt), len(prompt)
    raise ApiError(400, "prompt must be a string, a list of token ids, or a list with one of "
                   "those", "prompt")


def _messages(body: Dict[str, Any]) -> tuple:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "messages: Field required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           "messages")
    rendered = textgen.render_chat(msgs)
    return textgen.prompt_key("text", rendered), textgen.count_tokens(rendered)


def parse(body: Any, chat: bool, served: List[str], max_model_len: int,
          default_max: int) -> Parsed:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served[0]
    elif not isinstance(model, str) or model not in served:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    key, ptoks = _messages(body) if chat else _prompt(body)
    n = _int_field(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "the emulator supports n=1 only", "n")
    max_tokens = _int_field(body, "max_tokens", 1)
    if chat:
        mct = _int_field(body, "max_completion_tokens", 1)
        max_tokens = mct if mct is not None else max_tokens
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        if not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.",
                           "stream_options")
    opts = opts or {}
    kvp = body.get("kv_transfer_params")
    if kvp is not None and not isinstance(kvp, dict):
        raise ApiError(400, "kv_transfer_params must be an object", "kv_transfer_params")
    if ptoks > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                       f"However, your request has {ptoks} input tokens. Please reduce the "
                       "length of the input messages.")
    if max_tokens is None:
        max_tokens = min(default_max, max_model_len - ptoks) if chat else 16
    if ptoks + max_tokens > max_model_len:
        what = "messages" if chat else "prompt"
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. "
                       f"However, you requested {ptoks + max_tokens} tokens ({ptoks} in the "
                       f"{what}, {max_tokens} in the completion). Please reduce the length of "
                       f"the {what} or completion.")
    return Parsed(chat, model, key, ptoks, max(1, max_tokens), stream,
                  bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats")),
                  kvp)


def usage(prompt: int, completion: int, cached: int = 0) -> Dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached} if cached else None}


def response_id(p: Parsed, request_id: str) -> str:
    return ("chatcmpl-" if p.chat else "cmpl-") + request_id


def full_response(p: Parsed, rid: str, created: int, text: str, n: int, finish: str,
                  cached: int, kvtp: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if p.chat:
        choice: Dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "reasoning_content": None,
                        "tool_calls": []},
            "logprobs": None, "finish_reason": finish, "stop_reason": None,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                  "stop_reason": None, "prompt_logprobs": None}
    return {"id": response_id(p, rid),
            "object": "chat.completion" if p.chat else "text_completion",
            "created": created, "model": p.model, "choices": [choice],
            "usage": usage(p.prompt_tokens, n, cached), "kv_transfer_params": kvtp}


def chunk(p: Parsed, rid: str, created: int, text: Optional[str], finish: Optional[str],
          first: bool = False) -> Dict[str, Any]:
    if p.chat:
        delta: Dict[str, Any] = {"role": "assistant", "content": text or ""} if first else (
            {"content": text} if text is not None else {})
        choice: Dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish,
                  "stop_reason": None}
    if finish is not None:
        choice["stop_reason"] = None
    return {"id": response_id(p, rid),
            "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": created, "model": p.model, "choices": [choice]}


def usage_chunk(p: Parsed, rid: str, created: int, n: int, cached: int) -> Dict[str, Any]:
    return {"id": response_id(p, rid),
            "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": created, "model": p.model, "choices": [],
            "usage": usage(p.prompt_tokens, n, cached)}


_SENTINEL = "\u0001pd-emu-token\u0001"


def chunk_template(p: Parsed, rid: str, created: int) -> tuple:
    """(head, tail) bytes such that ``head + json_string(text) + tail`` is the JSON of a
    token chunk; saves encoding the whole chunk for every token."""
    enc = json.dumps(chunk(p, rid, created, _SENTINEL, None), separators=(",", ":"))
    head, _, tail = enc.partition(json.dumps(_SENTINEL))
    return head.encode(), tail.encode()
