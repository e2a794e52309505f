"""The backends' httpx transport (bot/backends/transport.py) against real loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import socket
import ssl
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bot.backends.base import Backend, Content, Message, Timeouts
from bot.backends.ollama import OllamaBackend
from bot.backends.openai import OpenAIBackend
from bot.backends.transport import AsyncioTransport
from bot.errors import BackendTimeout
from bot.settings import BackendConfig
from tests.fakes.model_server import FakeModelServer, Script

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


class Server:
    """A raw HTTP/1.1 server on loopback: every connection is handed to `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        finally:
            server.close()
            await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length only, as httpx sends JSON)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def client(**timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AsyncioTransport(), timeout=httpx.Timeout(5.0, **timeouts))


async def test_a_chunked_stream_arrives_whole_and_the_connection_is_kept() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(CHUNKED)
            for i in range(5):
                writer.write(chunk(b'{"n": %d}\n' % i))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = Server(answer)
    async with server.running() as url, client() as http:
        for _ in range(2):
            async with http.stream("POST", url + "/api/chat", json={"x": 1}) as response:
                lines = [line async for line in response.aiter_lines()]
            assert response.status_code == 200
            assert lines == [f'{{"n": {i}}}' for i in range(5)]
    assert server.connections == 1


async def test_a_stalled_stream_is_a_read_timeout() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + chunk(b'{"n": 0}\n'))
        await writer.drain()
        await asyncio.sleep(5)

    seen: list[bytes] = []
    async with Server(stall).running() as url, client(read=0.2) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            async with http.stream("GET", url) as response:
                async for part in response.aiter_raw():
                    seen.append(part)
    assert seen == [b'{"n": 0}\n']
    assert 0.15 < time.monotonic() - started < 1.5


async def test_no_status_line_in_time_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with Server(silent).running() as url, client(read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(url)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{closed_port()}/")


async def test_a_host_name_is_looked_up() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"Content-Length: 3\r\n\r\nok\n")
        await writer.drain()

    async with Server(answer).running() as url, client() as http:
        response = await http.get(url.replace("127.0.0.1", "localhost"))
    assert response.text == "ok\n"


@contextlib.contextmanager
def full_listener() -> Iterator[int]:
    """The port of a listening socket whose accept queue is full: the kernel ignores new SYNs."""
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(3):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        yield int(listener.getsockname()[1])


async def test_a_connection_that_is_never_accepted_is_a_connect_timeout() -> None:
    with full_listener() as port:
        with socket.socket() as probe:
            probe.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                probe.connect(("127.0.0.1", port))
                pytest.skip("this kernel completes connections to a full accept queue")
        async with client(connect=0.3) as http:
            started = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await http.get(f"http://127.0.0.1:{port}/")
        assert time.monotonic() - started < 1.5


async def test_a_tls_handshake_that_never_comes_is_a_connect_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)  # accepts TCP, never answers the ClientHello

    async with Server(mute).running() as url, client(connect=0.2) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            await http.get(url.replace("http://", "https://"))
    assert time.monotonic() - started < 1.5


async def test_a_server_that_closes_mid_body_is_a_protocol_error() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + chunk(b'{"n": 0}\n'))
        await writer.drain()

    async with Server(cut).running() as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


async def test_a_kept_connection_the_server_closed_is_not_reused() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"Content-Length: 3\r\n\r\nok\n")
        await writer.drain()  # and close, though the response said keep-alive

    server = Server(once)
    async with server.running() as url, client() as http:
        assert (await http.get(url)).text == "ok\n"
        await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
        assert (await http.get(url)).text == "ok\n"
    assert server.connections == 2


async def test_a_large_body_read_slowly_arrives_whole() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: past the read buffer's high-water mark

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()

    digest = hashlib.sha256()
    async with (
        Server(big).running() as url,
        client() as http,
        http.stream("GET", url) as response,
    ):
        await asyncio.sleep(0.2)  # let the socket fill the buffer before the first read
        async for part in response.aiter_raw():
            digest.update(part)
    assert digest.digest() == hashlib.sha256(body).digest()


async def test_leaving_early_closes_the_socket() -> None:
    server: Server

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED)
        while not reader.at_eof():
            writer.write(chunk(b'{"n": 0}\n'))
            await writer.drain()
            await asyncio.sleep(0.01)
        server.closed_by_client.set()

    server = Server(endless)
    async with server.running() as url, client() as http:
        async with http.stream("GET", url) as response:
            async for _ in response.aiter_raw():
                break
        await asyncio.wait_for(server.closed_by_client.wait(), 2)


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, made by the openssl command line tool."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_round_trip_and_an_untrusted_certificate_is_refused(
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(CHUNKED + chunk(b'{"n": 0}\n') + b"0\r\n\r\n")
            await writer.drain()

    server = Server(answer)
    async with server.running(server_context) as url:
        async with httpx.AsyncClient(transport=AsyncioTransport(verify=trusting)) as http:
            for _ in range(2):
                response = await http.get(url)
                assert response.text == '{"n": 0}\n'
                stream = response.extensions["network_stream"]
                assert stream.get_extra_info("ssl_object") is not None
        assert server.connections == 1  # the TLS connection was reused
        # the default trust store (certifi) does not know this certificate: refused
        async with httpx.AsyncClient(transport=AsyncioTransport()) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(url)


# --- the line reader's timer (bot/backends/ollama.py StallTimer), through both backends -------


def backend(kind: str, url: str, timeouts: Timeouts) -> Backend:
    config = BackendConfig(name=f"{kind}-box", kind=kind, url=url)  # type: ignore[arg-type]
    return (OllamaBackend if kind == "ollama" else OpenAIBackend)(config, timeouts)


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_consumer_holding_a_chunk_past_the_idle_limit_is_no_timeout(kind: str) -> None:
    async with FakeModelServer() as server:
        server.script(Script(tokens=["a", "b", "c"]))
        made = backend(kind, server.url, Timeouts(connect=1, first_chunk=5, idle=0.2))
        seen = []
        try:
            async for piece in made.chat("llama3.2", [Message("user", "hi")]):
                seen.append(piece)
                await asyncio.sleep(0.4)  # only waiting for the server is timed
        finally:
            await made.aclose()
    assert [p for p in seen if isinstance(p, Content)] == [Content("a"), Content("b"), Content("c")]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_cancelled_reader_stays_cancelled_not_a_timeout(kind: str) -> None:
    async with FakeModelServer() as server:
        server.script(Script(tokens=["a", "b"], delay=5))
        made = backend(kind, server.url, Timeouts(connect=1, first_chunk=5, idle=0.3))

        async def read() -> None:
            async for _ in made.chat("llama3.2", [Message("user", "hi")]):
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(0.1)  # the first chunk is in; the reader waits for the next
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await made.aclose()


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_the_idle_limit_applies_from_the_first_line_on(kind: str) -> None:
    async with FakeModelServer() as server:
        server.script(Script(tokens=["a", "b"], delay=2))
        made = backend(kind, server.url, Timeouts(connect=1, first_chunk=5, idle=0.2))
        started = time.monotonic()
        try:
            with pytest.raises(BackendTimeout):
                async for _ in made.chat("llama3.2", [Message("user", "hi")]):
                    pass
        finally:
            await made.aclose()
    assert time.monotonic() - started < 1.5  # the idle limit, not the first-chunk one


# --- keeping the connection after a reply (bot/backends/ollama.py rest_of_body) ---------------

DONE_LINES = {
    "ollama": [b'{"message":{"content":"hi"},"done":false}\n', b'{"done":true}\n'],
    "openai": [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"],
}


def replies(kind: str, *, end: bool) -> Handler:
    """Answers every request on a connection with one short reply; `end=False`: after the
    reply's last line the body never ends (a server that stalls there)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(CHUNKED + b"".join(chunk(line) for line in DONE_LINES[kind]))
            if not end:
                await writer.drain()
                await asyncio.sleep(5)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return handler


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_consecutive_replies_share_one_connection(kind: str) -> None:
    server = Server(replies(kind, end=True))
    async with server.running() as url:
        made = backend(kind, url, Timeouts(connect=1, first_chunk=5, idle=5))
        try:
            for _ in range(3):
                chunks = [c async for c in made.chat("m", [Message("user", "hi")])]
                assert chunks[0] == Content("hi")
        finally:
            await made.aclose()
    assert server.connections == 1


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_body_that_does_not_end_after_the_reply_costs_at_most_a_moment(kind: str) -> None:
    server = Server(replies(kind, end=False))
    async with server.running() as url:
        made = backend(kind, url, Timeouts(connect=1, first_chunk=5, idle=5))
        try:
            for _ in range(2):
                started = time.monotonic()
                chunks = [c async for c in made.chat("m", [Message("user", "hi")])]
                assert chunks[0] == Content("hi")
                assert time.monotonic() - started < 1.5  # END_OF_BODY, not the idle limit
        finally:
            await made.aclose()
    assert server.connections == 2  # not reused: it was closed


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_stream_gzipped_by_a_proxy_is_read(kind: str) -> None:
    """A proxy in front of the model server may compress the stream (httpx asks for gzip):
    each line flushed as it comes, as a streaming proxy does."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        packer = zlib.compressobj(wbits=31)  # gzip framing
        writer.write(HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        for line in [*DONE_LINES[kind][:-1], *DONE_LINES[kind]]:
            writer.write(chunk(packer.compress(line) + packer.flush(zlib.Z_SYNC_FLUSH)))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(chunk(packer.flush()) + b"0\r\n\r\n")
        await writer.drain()

    async with Server(handler).running() as url:
        made = backend(kind, url, Timeouts(connect=1, first_chunk=5, idle=5))
        try:
            chunks = [c async for c in made.chat("m", [Message("user", "hi")])]
        finally:
            await made.aclose()
    assert [c for c in chunks if isinstance(c, Content)] == [Content("hi"), Content("hi")]
