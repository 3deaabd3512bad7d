"""Router mode with router_stream_fix, for real: nginx + njs (pd_stream_fix.js) in front
of an aiohttp server that answers the way KsanaLLM's simple_router does (facts §2.6):
a streaming /v1 answer as application/octet-stream ending "data: [DONE]\\n\\n[DONE]\\0",
a 500 with FastAPI's plain-text body when a node is unreachable, a 503 {"detail"} when
no pair is available. Chunkings vary: the trailer alone, glued to the marker, the
marker split across writes."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.proxy.harness import http, needs_nginx, post, sse_events

pytestmark = needs_nginx

ROUTER_HOST = "127.0.1.151"
MODEL = "demo-model"
BODY = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}


def _events(n: int) -> list[bytes]:
    return [b"data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}).encode()
            + b"\n\n" for i in range(n)]


# how the fake router cuts its stream into writes
CHUNKINGS = {
    # what simple_router does: decode chunks as they come, then EOS+DELIM on its own
    "trailer-alone": lambda ev: ev + [b"data: [DONE]\n\n", b"[DONE]\x00"],
    "glued": lambda ev: [b"".join(ev) + b"data: [DONE]\n\n[DONE]\x00"],
    "marker-split": lambda ev: ev + [b"data: [DO", b"NE]\n", b"\n[DON", b"E]\x00"],
    "no-marker": lambda ev: ev + [b"[DONE]\x00"],
}


class FakeRouter:
    """Answers /v1/* per `self.mode`: a chunking name, "500" or "503"."""

    def __init__(self, aloop, port: int):
        self.loop, self.port = aloop, port
        self.mode = "trailer-alone"
        self.runner = None

    async def _handle(self, request):
        from aiohttp import web

        body = await request.json()
        if self.mode == "500":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "503":
            return web.json_response({"detail": "No available nodes for processing"},
                                     status=503)
        if not body.get("stream"):
            return web.json_response({"object": "text_completion", "choices": [
                {"index": 0, "text": "abc", "finish_reason": "length"}]})
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for piece in CHUNKINGS[self.mode](_events(3)):
            await resp.write(piece)
            await asyncio.sleep(0.02)  # separate writes reach nginx separately
        await resp.write_eof()
        return resp

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("POST", "/v1/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, ROUTER_HOST, self.port).start()

    def start(self) -> FakeRouter:
        self.loop.run(self._start())
        return self

    def stop(self) -> None:
        self.loop.run(self.runner.cleanup())


@pytest.fixture
def fixed(aloop, proxy_factory):
    from tests.proxy.harness import free_port

    router = FakeRouter(aloop, free_port(ROUTER_HOST)).start()
    px = proxy_factory(router=[f"{ROUTER_HOST}:{router.port}"], router_stream_fix=True)
    yield router, px
    router.stop()


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
def test_stream_reaches_clients_as_clean_sse(fixed, chunking):
    router, px = fixed
    router.mode = chunking
    status, headers, data = post(px.url + "/v1/completions", BODY)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert b"\x00" not in data
    expected = b"".join(_events(3))
    if chunking != "no-marker":
        expected += b"data: [DONE]\n\n"
    assert data == expected
    assert [e["choices"][0]["text"] for e in sse_events(data) if e != "[DONE]"] == \
        ["t0", "t1", "t2"]


def test_json_answers_pass_untouched(fixed):
    router, px = fixed
    status, headers, data = post(px.url + "/v1/completions", dict(BODY, stream=False))
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(data)["choices"][0]["text"] == "abc"


@pytest.mark.parametrize("mode,message", [
    ("500", "engine router: Internal Server Error"),
    ("503", "engine router: No available nodes for processing"),
])
def test_router_errors_become_openai_errors(fixed, mode, message):
    router, px = fixed
    router.mode = mode
    status, headers, data = post(px.url + "/v1/chat/completions",
                                 {"model": MODEL, "messages": [], "stream": True})
    assert status == int(mode)
    assert headers["content-type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert err["message"] == message and err["code"] == int(mode)
    assert err["type"] in ("InternalServerError", "ServiceUnavailableError")


def test_without_the_option_the_router_stream_is_passed_as_is(aloop, proxy_factory):
    from tests.proxy.harness import free_port

    router = FakeRouter(aloop, free_port(ROUTER_HOST)).start()
    try:
        px = proxy_factory(router=[f"{ROUTER_HOST}:{router.port}"])
        status, headers, data = post(px.url + "/v1/completions", BODY)
        assert status == 200 and data.endswith(b"data: [DONE]\n\n[DONE]\x00")
        assert headers["content-type"].startswith("application/octet-stream")
        assert http("GET", px.url + "/health")[0] == 200
    finally:
        router.stop()
