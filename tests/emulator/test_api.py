"""The OpenAI-compatible API of one aggregated engine."""
from __future__ import annotations

import json

import pytest

from pd_launcher.emulator import textgen
from tests.emulator.helpers import free_port, metric, request, sse, sse_text

HOST = "127.0.1.10"


@pytest.fixture(scope="module")
def agg(module_emus):
    return module_emus("agg", HOST, free_port(HOST), [
        "--served-model-name", "demo", "alias", "--max-model-len", "200",
        "--max-num-seqs", "4"]).wait_ready()


@pytest.fixture(scope="module")
def keyed(module_emus):
    return module_emus("keyed", "127.0.1.11", free_port("127.0.1.11"), [
        "--served-model-name", "demo", "--api-key", "s3cret"]).wait_ready()


def test_completion_body_usage_and_request_id(agg):
    status, hdrs, body = agg.post("/v1/completions",
                                  {"model": "demo", "prompt": "Hello there", "max_tokens": 5},
                                  headers={"X-Request-Id": "req-42"})
    assert status == 200 and hdrs["x-request-id"] == "req-42"
    assert body["id"] == "cmpl-req-42" and body["object"] == "text_completion"
    assert body["model"] == "demo"
    ch = body["choices"][0]
    key = textgen.prompt_key("text", "Hello there")
    assert ch["text"] == textgen.text("demo", key, 5) and ch["finish_reason"] == "length"
    # "Hello there" counts hell|o|ther|e = 4 tokens
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9,
                             "prompt_tokens_details": None}
    assert body["kv_transfer_params"] is None
    # same request, same text; the model is part of the identity
    assert agg.post("/v1/completions", {"model": "demo", "prompt": "Hello there",
                                        "max_tokens": 5})[2]["choices"][0]["text"] == ch["text"]
    other = agg.post("/v1/completions", {"model": "alias", "prompt": "Hello there",
                                         "max_tokens": 5})[2]
    assert other["model"] == "alias" and other["choices"][0]["text"] != ch["text"]


def test_token_id_prompt_and_default_max_tokens(agg):
    status, _, body = agg.post("/v1/completions", {"prompt": [5, 6, 7, 8]})
    assert status == 200 and body["model"] == "demo"
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 16


def test_chat_completion(agg):
    msgs = [{"role": "user", "content": "What is KV?"}]
    status, hdrs, body = agg.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 4})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-" + hdrs["x-request-id"]
    msg = body["choices"][0]["message"]
    key = textgen.prompt_key("text", textgen.render_chat(msgs))
    assert msg["role"] == "assistant" and msg["content"] == textgen.text("demo", key, 4)
    assert body["usage"]["prompt_tokens"] == textgen.count_tokens(textgen.render_chat(msgs))
    # max_completion_tokens wins over max_tokens; default fills up to max-model-len
    body = agg.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 9,
                                             "max_completion_tokens": 2})[2]
    assert body["usage"]["completion_tokens"] == 2
    body = agg.post("/v1/chat/completions", {"messages": msgs})[2]
    assert body["usage"]["total_tokens"] == 200


def test_streaming_completion_with_usage(agg):
    status, events = sse(HOST, agg.port, "/v1/completions",
                         {"prompt": "stream me", "max_tokens": 6, "stream": True,
                          "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1][1] == "[DONE]"
    objs = [json.loads(d) for _, d in events[:-1]]
    assert all(o["object"] == "text_completion" for o in objs)
    assert [o["choices"][0]["finish_reason"] for o in objs[:-1]] == [None] * 6 + ["length"]
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 6
    key = textgen.prompt_key("text", "stream me")
    assert sse_text(events) == textgen.text("demo", key, 6)
    # without include_usage: no usage chunk
    _, events = sse(HOST, agg.port, "/v1/completions",
                    {"prompt": "stream me", "max_tokens": 2, "stream": True})
    assert all("usage" not in json.loads(d) for _, d in events[:-1])
    # continuous usage stats ride on every chunk
    _, events = sse(HOST, agg.port, "/v1/completions",
                    {"prompt": "x", "max_tokens": 2, "stream": True,
                     "stream_options": {"continuous_usage_stats": True}})
    assert [json.loads(d)["usage"]["completion_tokens"] for _, d in events[:2]] == [1, 2]


def test_streaming_chat(agg):
    msgs = [{"role": "user", "content": "hi"}]
    status, events = sse(HOST, agg.port, "/v1/chat/completions",
                         {"messages": msgs, "max_tokens": 3, "stream": True,
                          "stream_options": {"include_usage": True}})
    objs = [json.loads(d) for _, d in events[:-1]]
    assert status == 200 and events[-1][1] == "[DONE]"
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert objs[-2]["choices"][0]["finish_reason"] == "length"
    assert objs[-1]["usage"]["completion_tokens"] == 3
    key = textgen.prompt_key("text", textgen.render_chat(msgs))
    assert sse_text(events) == textgen.text("demo", key, 3)


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/completions", b"{not json", 400, "invalid JSON body"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"model": "demo"}, 400, "prompt: Field required"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt must be"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=1 only"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "Stream options can only be defined when `stream=True`."),
    ("/v1/completions", {"prompt": "x", "kv_transfer_params": [1]}, 400,
     "kv_transfer_params must be an object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 200}, 400,
     "maximum context length is 200 tokens"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404,
     "The model `gpt-4` does not exist."),
    ("/v1/chat/completions", {"model": "demo"}, 400, "messages: Field required"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "string role"),
])
def test_bad_requests_get_openai_errors(agg, path, body, status, needle):
    got, hdrs, data = request(HOST, agg.port, "POST", path,
                              body if isinstance(body, bytes) else json.dumps(body),
                              headers={"X-Request-Id": "bad-1"})
    err = json.loads(data)["error"]
    assert got == status and needle in err["message"], err
    assert err["code"] == status and err["type"] in ("BadRequestError", "NotFoundError")
    assert hdrs["x-request-id"] == "bad-1"


def test_models_and_health(agg):
    status, _, data = request(HOST, agg.port, "GET", "/v1/models")
    body = json.loads(data)
    assert status == 200 and [m["id"] for m in body["data"]] == ["demo", "alias"]
    assert body["data"][0]["root"] == "/models/demo" and body["data"][0]["max_model_len"] == 200
    assert agg.health() == 200


def test_metrics_parse_and_count(agg):
    before = agg.metrics()
    agg.post("/v1/completions", {"prompt": "count me please", "max_tokens": 7})
    after = agg.metrics()
    lv = {"model_name": "demo", "engine": "0"}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"):
        assert any(n == name for n, _ in after), name
    d = {n: metric(after, n, **lv) - metric(before, n, **lv) for n in (
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count")}
    assert d == {"vllm:prompt_tokens_total": 5, "vllm:generation_tokens_total": 7,
                 "vllm:time_to_first_token_seconds_count": 1,
                 "vllm:inter_token_latency_seconds_count": 6,
                 "vllm:e2e_request_latency_seconds_count": 1}
    assert metric(after, "vllm:num_requests_running", **lv) == 0
    # KV and abort counters exist from the start (at 0) so dashboards can rate() them
    for name in ("pd_emu:kv_transfers_total", "pd_emu:kv_recomputes_total",
                 "pd_emu:request_aborts_total"):
        assert (name, tuple(sorted(lv.items()))) in after, name


def test_api_key(keyed):
    port = keyed.port
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    assert request("127.0.1.11", port, "POST", "/v1/completions", body)[0] == 401
    status, _, data = request("127.0.1.11", port, "POST", "/v1/completions", body,
                              headers={"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(data) == {"error": "Unauthorized"}
    assert request("127.0.1.11", port, "GET", "/v1/models")[0] == 401
    assert request("127.0.1.11", port, "GET", "/v1/models",
                   headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert request("127.0.1.11", port, "POST", "/v1/completions", body,
                   headers={"Authorization": "Bearer s3cret"})[0] == 200
    assert request("127.0.1.11", port, "GET", "/admin/faults")[0] == 401
    # health and metrics stay open, as in vLLM
    assert request("127.0.1.11", port, "GET", "/health")[0] == 200
    assert request("127.0.1.11", port, "GET", "/metrics")[0] == 200
