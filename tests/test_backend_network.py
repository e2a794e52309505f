"""Both backends over real loopback sockets: connections kept and closed, TLS, gzip, timeouts.

The model is the fake Ollama (tests/fakes/model_server.py), reached through a TCP relay that
counts the connections a backend opens (and terminates TLS when asked); where the fake cannot
say it on the wire (a gzipped stream, a stall or a cut after the headers), a raw HTTP/1.1 handler
answers instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bot.backends.base import Backend, Chunk, Content, Message, Timeouts
from bot.errors import BackendStreamError, BackendTimeout, BackendUnreachable
from tests.fakes.model_server import FakeModelServer, Script
from tests.support import closed_url, make_backend, until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
KINDS = ["ollama", "openai"]
HELLO = [Message("user", "hi")]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
QUICK = Timeouts(connect=2, first_chunk=5, idle=5)


class Server:
    """A TCP server on loopback (TLS if given a context) that hands each connection to
    `handler`, counting them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        finally:
            server.close()
            await server.wait_closed()


def relay_to(url: str) -> Handler:
    """Pass a connection's bytes both ways to the server at `url`, and a close either way."""
    port = urlsplit(url).port

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            sink.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return relay


async def read_request(reader: asyncio.StreamReader) -> None:
    """One request's head and body (Content-Length only, as httpx sends JSON)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def contents(backend: Backend) -> list[str]:
    return [c.text async for c in backend.chat("llama3.2", HELLO) if isinstance(c, Content)]


async def failure(backend: Backend) -> tuple[Exception, float]:
    """Ask for a reply that must fail: its error and the seconds that took; closes `backend`."""
    started = time.monotonic()
    try:
        await contents(backend)
    except Exception as e:
        return e, time.monotonic() - started
    finally:
        await backend.aclose()
    raise AssertionError("the reply did not fail")


@pytest.fixture
async def fake() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer() as server:
        yield server


# --- connections -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_consecutive_replies_share_one_connection(kind: str, fake: FakeModelServer) -> None:
    relay = Server(relay_to(fake.url))
    async with relay.running() as url:
        backend = make_backend(kind, url, timeouts=QUICK)
        try:
            for _ in range(3):
                fake.script(Script(tokens=["a", "b"]))
                assert await contents(backend) == ["a", "b"]
        finally:
            await backend.aclose()
    assert relay.connections == 1
    assert fake.completed == 3


@pytest.mark.parametrize("kind", KINDS)
async def test_leaving_early_closes_the_connection_and_the_next_reply_opens_another(
    kind: str, fake: FakeModelServer
) -> None:
    relay = Server(relay_to(fake.url))
    async with relay.running() as url:
        backend = make_backend(kind, url, timeouts=QUICK)
        try:
            fake.script(Script(tokens=[f"t{i} " for i in range(50)], delay=0.05), Script())
            async with contextlib.aclosing(backend.chat("llama3.2", HELLO)) as chunks:  # type: ignore[type-var]
                async for _ in chunks:
                    break
            await until(lambda: fake.disconnects == 1, within=10)
            assert await contents(backend) == ["You", " said:", " hi"]
        finally:
            await backend.aclose()
    assert relay.connections == 2
    assert fake.completed == 1


async def test_more_than_a_hundred_streams_of_one_backend_are_open_at_once(
    fake: FakeModelServer,
) -> None:
    """No cap on connections (the router's per-backend cap limits generations): every stream
    keeps its connection until all of them have their first chunk; a pool capped at 100 would
    make the others wait for a connection until the connect limit."""
    n = 120
    fake.script(*[Script(tokens=["a", "b"], delay=30)] * n)
    started = 0
    all_started = asyncio.Event()
    backend = make_backend("ollama", fake.url, timeouts=QUICK)

    async def first_chunk() -> Chunk:
        nonlocal started
        async with contextlib.aclosing(backend.chat("llama3.2", HELLO)) as chunks:  # type: ignore[type-var]
            async for piece in chunks:
                started += 1
                if started == n:
                    all_started.set()
                await all_started.wait()
                return piece
        raise AssertionError("no chunk")

    try:
        firsts = await asyncio.wait_for(asyncio.gather(*(first_chunk() for _ in range(n))), 60)
    finally:
        await backend.aclose()
    assert firsts == [Content("a")] * n
    assert fake.max_in_flight == n


# --- TLS --------------------------------------------------------------------------------------


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


async def test_tls_with_a_custom_ca_is_trusted_and_kept_and_an_unknown_one_is_refused(
    self_signed: tuple[Path, Path], fake: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    relay = Server(relay_to(fake.url))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with relay.running(tls) as url:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how an operator adds a private CA
        trusting = make_backend("ollama", url, timeouts=QUICK)
        try:
            for _ in range(2):
                fake.script(Script(tokens=["a", "b"]))
                assert await contents(trusting) == ["a", "b"]
        finally:
            await trusting.aclose()
        assert relay.connections == 1  # one handshake for both replies

        monkeypatch.delenv("SSL_CERT_FILE")  # the default trust store does not know it
        refusing = make_backend("ollama", url, timeouts=QUICK)
        try:
            with pytest.raises(BackendUnreachable):
                await contents(refusing)
        finally:
            await refusing.aclose()
    assert fake.completed == 2


# --- bodies -----------------------------------------------------------------------------------

DONE_LINES = {
    "ollama": [b'{"message":{"content":"hi"},"done":false}\n', b'{"done":true}\n'],
    "openai": [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"],
}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_gzipped_by_a_proxy_is_read(kind: str) -> None:
    """A proxy in front of the model server may compress the stream (httpx asks for gzip),
    flushing each line as it comes; httpx decodes it, once."""

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        packer = zlib.compressobj(wbits=31)  # gzip framing
        writer.write(HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        for line in [*DONE_LINES[kind][:-1], *DONE_LINES[kind]]:
            writer.write(chunk(packer.compress(line) + packer.flush(zlib.Z_SYNC_FLUSH)))
            await writer.drain()
        writer.write(chunk(packer.flush()) + b"0\r\n\r\n")
        await writer.drain()

    async with Server(gzipped).running() as url:
        backend = make_backend(kind, url, timeouts=QUICK)
        try:
            assert await contents(backend) == ["hi", "hi"]
        finally:
            await backend.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_body_that_does_not_end_after_the_reply_costs_at_most_a_moment(kind: str) -> None:
    async def unended(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(CHUNKED + b"".join(chunk(line) for line in DONE_LINES[kind]))
            await writer.drain()
            await asyncio.sleep(30)  # the body's end never comes

    server = Server(unended)
    async with server.running() as url:
        backend = make_backend(kind, url, timeouts=Timeouts(connect=2, first_chunk=30, idle=30))
        try:
            for _ in range(2):
                started = time.monotonic()
                assert await contents(backend) == ["hi"]
                assert time.monotonic() - started < 10  # END_OF_BODY, not the idle limit
        finally:
            await backend.aclose()
    assert server.connections == 2  # not reused: it was closed


@pytest.mark.parametrize("kind", KINDS)
async def test_a_connection_cut_mid_stream_is_a_stream_error(kind: str) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + chunk(DONE_LINES[kind][0]))
        await writer.drain()  # and close, mid-body

    async with Server(cut).running() as url:
        backend = make_backend(kind, url, timeouts=QUICK)
        seen = []
        try:
            with pytest.raises(BackendStreamError, match="connection broke"):
                async for piece in backend.chat("llama3.2", HELLO):
                    seen.append(piece)
        finally:
            await backend.aclose()
    assert seen == [Content("hi")]


async def test_a_malformed_answer_is_unreachable() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with Server(garbage).running() as url:
        backend = make_backend("ollama", url, timeouts=QUICK)
        try:
            with pytest.raises(BackendUnreachable):
                await contents(backend)
        finally:
            await backend.aclose()


# --- connect, first-chunk and idle limits ------------------------------------------------------


async def test_a_refused_connection_is_unreachable_and_no_timeout() -> None:
    backend = make_backend("ollama", closed_url(), timeouts=QUICK)
    try:
        with pytest.raises(BackendUnreachable) as caught:
            await contents(backend)
    finally:
        await backend.aclose()
    assert caught.value.message == "ConnectError"


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


async def test_a_connection_never_accepted_is_a_connect_timeout() -> None:
    with full_listener() as port:
        with socket.socket() as probe:
            probe.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                probe.connect(("127.0.0.1", port))
                pytest.skip("this kernel completes connections to a full accept queue")
        backend = make_backend(
            "ollama", f"http://127.0.0.1:{port}", timeouts=Timeouts(connect=0.3, first_chunk=30)
        )
        error, took = await failure(backend)
    assert isinstance(error, BackendUnreachable) and error.message == "ConnectTimeout"
    assert took < 10  # the connect limit, not the first-chunk one


async def test_a_tls_handshake_that_never_comes_is_a_connect_timeout() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # accepts TCP, never answers the ClientHello

    async with Server(mute).running() as url:
        backend = make_backend(
            "ollama", url.replace("http:", "https:"), timeouts=Timeouts(connect=0.3, first_chunk=30)
        )
        error, took = await failure(backend)
    assert isinstance(error, BackendUnreachable) and error.message == "ConnectTimeout"
    assert took < 10


# a status line and headers, then nothing: no first chunk; an error status whose body never comes
STUCK_ANSWERS = {
    "no_first_line": b"",
    "error_body_never_comes": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100\r\n\r\n{",
}


@pytest.mark.parametrize("answer", list(STUCK_ANSWERS))
async def test_an_answer_that_stops_before_its_first_chunk_is_a_timeout(answer: str) -> None:
    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STUCK_ANSWERS[answer] or CHUNKED)
        await writer.drain()
        await asyncio.sleep(30)

    async with Server(stuck).running() as url:
        backend = make_backend("ollama", url, timeouts=Timeouts(connect=2, first_chunk=0.3))
        error, took = await failure(backend)
    assert isinstance(error, BackendTimeout)
    assert took < 10  # the first-chunk limit, not the idle one (60 s)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_idle_limit_applies_from_the_first_line_on(
    kind: str, fake: FakeModelServer
) -> None:
    fake.script(Script(tokens=["a", "b"], delay=30))
    backend = make_backend(kind, fake.url, timeouts=Timeouts(connect=2, first_chunk=30, idle=0.3))
    seen = []
    started = time.monotonic()
    try:
        with pytest.raises(BackendTimeout):
            async for piece in backend.chat("llama3.2", HELLO):
                seen.append(piece)
    finally:
        await backend.aclose()
    assert seen == [Content("a")]
    assert time.monotonic() - started < 10  # the idle limit, not the first-chunk one


@pytest.mark.parametrize("kind", KINDS)
async def test_a_consumer_holding_a_chunk_past_the_idle_limit_is_no_timeout(
    kind: str, fake: FakeModelServer
) -> None:
    fake.script(Script(tokens=["a", "b", "c"]))
    backend = make_backend(kind, fake.url, timeouts=Timeouts(connect=2, first_chunk=5, idle=0.2))
    try:
        seen = []
        async for piece in backend.chat("llama3.2", HELLO):
            seen.append(piece)
            await asyncio.sleep(0.4)  # only waiting for the server is timed
    finally:
        await backend.aclose()
    assert [p for p in seen if isinstance(p, Content)] == [Content("a"), Content("b"), Content("c")]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancelled_reader_stays_cancelled_not_a_timeout(
    kind: str, fake: FakeModelServer
) -> None:
    fake.script(Script(tokens=["a", "b"], delay=30))
    backend = make_backend(kind, fake.url, timeouts=Timeouts(connect=2, first_chunk=5, idle=5))
    first = asyncio.Event()

    async def read() -> None:
        async for _ in backend.chat("llama3.2", HELLO):
            first.set()  # and wait for the next chunk

    task = asyncio.create_task(read())
    try:
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await backend.aclose()
    await until(lambda: fake.disconnects == 1, within=10)
