"""What every emulated OpenAI server shares (the xLLM instance and service, the
FastDeploy instance): the two POST endpoints dispatched to one `_generate(request,
chat)`, and the count of requests in flight that a graceful stop waits on."""
from __future__ import annotations

import asyncio

from aiohttp import web


class OpenAIEndpoints:
    """Mixin: call `_init_inflight()` in __init__, implement `_generate`, wrap each
    request in `_enter()` / `_leave()`; `idle` is set while nothing is in flight."""

    inflight: int
    idle: asyncio.Event

    def _init_inflight(self) -> None:
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raise NotImplementedError

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def _leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()
