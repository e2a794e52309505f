"""A fake of Ollama's web search API on 127.0.0.1 (what PARLEY_WEB_SEARCH_URL points at).

`POST /api/web_search` takes `{"query", "max_results"}` (1–10, default 5) and answers
`{"results": [{"title", "url", "content"}]}`; `POST /api/web_fetch` takes `{"url"}` and answers
`{"title", "content", "links"}`; both want `Authorization: Bearer <key>` (docs.ollama.com's web
search page; ../shared/protocols/ollama.md). The error bodies are Ollama's `{"error": "…"}`.
Pages are what a test puts in `pages` (url → title, text, links); a search finds the pages
whose title or text has every word of the query, in the order they were added.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Page:
    title: str
    content: str
    links: list[str] = field(default_factory=list)


class FakeSearchServer:
    def __init__(self, api_key: str = "search-key") -> None:
        self.api_key = api_key
        self.pages: dict[str, Page] = {}
        self.requests: list[tuple[str, Any]] = []  # (path, parsed body)
        self.delay = 0.0  # seconds before each answer
        self.status: int | None = None  # answer every request with this error status
        self.url = ""
        self._runner: web.AppRunner | None = None

    def add(self, url: str, title: str, content: str, links: list[str] | None = None) -> None:
        self.pages[url] = Page(title, content, links or [])

    async def __aenter__(self) -> FakeSearchServer:
        app = web.Application()
        app.router.add_post("/api/web_search", self._search)
        app.router.add_post("/api/web_fetch", self._fetch)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        self.requests.append((request.path, body))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.json_response({"error": "internal error"}, status=self.status)
        if not isinstance(body, dict):
            return web.json_response({"error": "invalid request"}, status=400)
        return body

    async def _search(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        query = body.get("query")
        wanted = body.get("max_results", 5)
        if not isinstance(query, str) or not query.strip():
            return web.json_response({"error": "query is required"}, status=400)
        if not isinstance(wanted, int) or not 1 <= wanted <= 10:
            return web.json_response({"error": "max_results must be 1 to 10"}, status=400)
        words = query.lower().split()
        found = [
            {"title": p.title, "url": url, "content": p.content}
            for url, p in self.pages.items()
            if all(w in f"{p.title} {p.content}".lower() for w in words)
        ]
        return web.json_response({"results": found[:wanted]})

    async def _fetch(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        url = body.get("url")
        if not isinstance(url, str) or not url:
            return web.json_response({"error": "url is required"}, status=400)
        page = self.pages.get(url)
        if page is None:
            return web.json_response({"error": f"could not fetch {url}"}, status=404)
        answer = {"title": page.title, "content": page.content, "links": page.links}
        return web.json_response(answer)
