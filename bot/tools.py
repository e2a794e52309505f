"""Tools a model may call while it answers: `web_search` and `web_fetch`, run by Ollama's web
search API (PARLEY_WEB_SEARCH_URL: POST /api/web_search {query, max_results} → {results: [{title,
url, content}]}, POST /api/web_fetch {url} → {title, content, links}; Bearer key).

Offered only with PARLEY_WEB_SEARCH and only to models that call tools (an Ollama's `tools`
capability; PARLEY_TOOL_MODELS globs for other servers). What the service answers is untrusted:
read into types, its size and its text bounded, and every failure becomes the call's result in
words, for the model to work with — never an exception out of `run`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from bot.backends.base import ModelInfo, Tool, ToolCall
from bot.markdown import clean_text
from bot.settings import Settings

log = logging.getLogger(__name__)

MAX_RESULTS = 5  # search results a call gets unless it asks for fewer (the service allows 10)
RESULT_CHARS = 1_500  # of each result's text given to the model
PAGE_CHARS = 8_000  # of a fetched page's text
PAGE_LINKS = 20  # of a fetched page's links
MAX_BODY = 2_000_000  # bytes of one answer read from the service
QUERY_CHARS = 400
TITLE_CHARS = 80  # of a source's title in the list a reply ends with
SOURCES_SHOWN = 8

WEB_SEARCH = Tool(
    "web_search",
    "Search the web for current or specific information. Returns the top results' titles, "
    "URLs and text. Cite the URLs you use.",
    {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to search for"},
            "max_results": {"type": "integer", "description": "how many results, 1 to 10"},
        },
        "required": ["query"],
    },
)
WEB_FETCH = Tool(
    "web_fetch",
    "Fetch one web page by its URL and return its title, text and links.",
    {
        "type": "object",
        "properties": {"url": {"type": "string", "description": "the page's http(s) URL"}},
        "required": ["url"],
    },
)
WEB_TOOLS = (WEB_SEARCH, WEB_FETCH)


class _Result(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: str = ""
    url: str = ""
    content: str = ""


class _Search(BaseModel):
    model_config = ConfigDict(extra="ignore")
    results: list[_Result] = []


class _Page(BaseModel):
    model_config = ConfigDict(extra="ignore")
    title: str = ""
    content: str = ""
    links: list[str] = []


@dataclass(frozen=True)
class Source:
    title: str
    url: str


@dataclass(frozen=True)
class ToolResult:
    content: str  # what the model reads
    sources: tuple[Source, ...] = ()
    failed: bool = False


def web_url(value: str) -> str | None:
    """`value` if it is an http(s) URL with a host and no spaces, else None."""
    value = value.strip()
    if len(value) > 2_000 or re.search(r"[\s<>]", value):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    return value if parts.scheme in ("http", "https") and parts.hostname else None


def progress(call: ToolCall) -> str:
    """What a reply shows while the call runs."""
    arguments = call.arguments or {}
    if call.name == WEB_SEARCH.name:
        query = " ".join(str(arguments.get("query", "")).split())[:120]
        return f"🔎 Searching: {query}…" if query else "🔎 Searching…"
    if call.name == WEB_FETCH.name:
        url = web_url(str(arguments.get("url", "")))
        where = urlsplit(url).hostname if url else None
        return f"🌐 Reading {where}…" if where else "🌐 Reading a page…"
    return "🛠️ Working…"


def sources_note(sources: list[Source]) -> str:
    """The list of links a reply ends with, in the core's Markdown (each platform shows links):
    each URL once, titles made safe to sit inside a link's brackets."""
    seen: dict[str, str] = {}
    for source in sources:
        if source.url not in seen:
            seen[source.url] = source.title
    lines = []
    for i, (url, title) in enumerate(list(seen.items())[:SOURCES_SHOWN], 1):
        label = " ".join(re.sub(r"[\[\]()<>*_`~|\\]", " ", title).split())[:TITLE_CHARS]
        label = label or urlsplit(url).hostname or url
        target = url.replace("(", "%28").replace(")", "%29")
        lines.append(f"{i}. [{label}]({target})")
    more = len(seen) - SOURCES_SHOWN
    tail = [f"…and {more} more"] if more > 0 else []
    return "\n".join(["**Sources**", *lines, *tail]) if lines else ""


class WebTools:
    """The web search service's two tools, for the replies of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        key = settings.search_key()
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self.client = httpx.AsyncClient(
            base_url=settings.web_search_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(settings.tool_timeout, connect=min(5.0, settings.tool_timeout)),
        )

    def offered(self, info: ModelInfo) -> tuple[Tool, ...]:
        """The tools a model is offered: none unless web search is on and its profile says it
        calls tools (an Ollama's capability; PARLEY_TOOL_MODELS for other servers)."""
        return WEB_TOOLS if self.settings.web_search and "tools" in info.capabilities else ()

    async def run(self, call: ToolCall) -> ToolResult:
        """Run one call the model made, within PARLEY_TOOL_TIMEOUT; never raises."""
        if call.arguments is None:
            return ToolResult("error: the arguments were not a JSON object", failed=True)
        try:
            async with asyncio.timeout(self.settings.tool_timeout):
                if call.name == WEB_SEARCH.name:
                    return await self._search(call.arguments)
                if call.name == WEB_FETCH.name:
                    return await self._fetch(call.arguments)
            return ToolResult(f"error: there is no tool named {call.name[:60]!r}", failed=True)
        except TimeoutError:
            log.warning("%s took over %.0f s", call.name, self.settings.tool_timeout)
            return ToolResult("error: the search service did not answer in time", failed=True)
        except (httpx.HTTPError, ValueError, ValidationError) as e:
            log.warning("%s failed: %s", call.name, type(e).__name__)
            return ToolResult("error: the search service could not be reached", failed=True)

    async def _search(self, arguments: dict[str, Any]) -> ToolResult:
        query = " ".join(str(arguments.get("query", "")).split())[:QUERY_CHARS]
        if not query:
            return ToolResult("error: `query` is required", failed=True)
        wanted = arguments.get("max_results", MAX_RESULTS)
        count = wanted if isinstance(wanted, int) and 1 <= wanted <= 10 else MAX_RESULTS
        body = await self._post("/api/web_search", {"query": query, "max_results": count})
        if isinstance(body, ToolResult):
            return body
        found = _Search.model_validate(body).results[:count]
        results = [r for r in found if web_url(r.url)]
        if not results:
            return ToolResult(f"No results for {query!r}.")
        parts = [
            f"[{i}] {clean_text(r.title)[:200]}\nURL: {r.url}\n"
            + clean_text(r.content)[:RESULT_CHARS]
            for i, r in enumerate(results, 1)
        ]
        sources = tuple(Source(clean_text(r.title), r.url) for r in results)
        return ToolResult("\n\n".join(parts), sources)

    async def _fetch(self, arguments: dict[str, Any]) -> ToolResult:
        url = web_url(str(arguments.get("url", "")))
        if url is None:
            return ToolResult("error: `url` must be an http(s) URL", failed=True)
        body = await self._post("/api/web_fetch", {"url": url})
        if isinstance(body, ToolResult):
            return body
        page = _Page.model_validate(body)
        links = [link for link in page.links if web_url(link)][:PAGE_LINKS]
        text = clean_text(page.content)
        cut = " …(cut)" if len(text) > PAGE_CHARS else ""
        shown = f"{clean_text(page.title)[:200]}\nURL: {url}\n\n{text[:PAGE_CHARS]}{cut}"
        if links:
            shown += "\n\nLinks:\n" + "\n".join(links)
        return ToolResult(shown, (Source(clean_text(page.title), url),))

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        """The service's JSON answer, or the call's result in words when it refused."""
        async with self.client.stream("POST", path, json=payload) as response:
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > MAX_BODY:
                    raise ValueError("answer too large")
        if response.status_code in (401, 403):
            log.error("the web search service refused the key (HTTP %d)", response.status_code)
            return ToolResult("error: web search is unavailable (its key was refused)", failed=True)
        if response.status_code == 429:
            return ToolResult("error: web search is rate limited; try later", failed=True)
        if response.status_code != 200:
            log.warning("the web search service answered HTTP %d", response.status_code)
            code = response.status_code
            return ToolResult(f"error: the search service answered HTTP {code}", failed=True)
        return json.loads(data)

    async def aclose(self) -> None:
        await self.client.aclose()
