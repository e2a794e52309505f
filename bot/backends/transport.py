"""An httpx transport whose sockets are read through asyncio's own protocol callbacks.

httpx's default transport reads through anyio: every socket read enters three context managers
(httpcore's `map_exceptions`, `anyio.fail_after`'s cancel scope, a resource guard) and resumes,
then pauses, reading on the socket around the wait (an epoll register and unregister per chunk).
Under hundreds of concurrent model streams, one HTTP chunk per token, that adds up
(docs/benchmarks.md §4).

`AsyncioBackend` is an `httpcore.AsyncNetworkBackend` on `loop.create_connection` with a
buffering `asyncio.Protocol`: the socket stays registered for the connection's whole life, a read
returns what is already buffered or waits on one future, and the read timeout is one timer per
connection that re-arms itself only when it fires. TLS is `loop.start_tls`. A connect timeout is
the kernel not having connected by the deadline, not the loop being late to notice.
`AsyncioTransport` is the `httpx.AsyncBaseTransport` that puts httpcore's connection pool
(HTTP/1.1, h11) on it, so the client API, the pool and the errors stay httpx's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import select
import socket
import ssl
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx

# httpcore 1.0.9 looks for the optional `sniffio` (anyio 4 no longer installs it) each time it makes
# a lock, an event or a cancellation shield: 4 times per request, 7 with a new connection. A failed
# import walks sys.path every time (~0.1 ms here; 0.6-0.7 ms of CPU per reply, bench.profile §4);
# None in sys.modules fails it at once, with the same ImportError. Nothing changes where sniffio is
# installed.
if importlib.util.find_spec("sniffio") is None:
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

# A connection stops reading from its socket past this many unread bytes (httpcore asks for
# 64 KiB at a time) and starts again once a read brought it under `_LOW_WATER`.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024

# The `timeout` parameters below (ruff's ASYNC109) are httpcore's network-backend interface.


class AsyncioStream(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One connection: the protocol asyncio feeds, and the stream httpcore reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer: bytes | bytearray = b""
        self._eof = False
        self._lost = False
        self._error: Exception | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._tls = False
        self._waiter: asyncio.Future[None] | None = None  # a read waiting for data
        self._drain: asyncio.Future[None] | None = None  # a write waiting for the buffer
        self._deadline: float | None = None  # when the waiting read times out
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._buffer:
            self._buffer = data  # the usual case: one chunk per wait, kept without a copy
        else:
            if isinstance(self._buffer, bytes):
                self._buffer = bytearray(self._buffer)
            self._buffer += data
            if len(self._buffer) > _HIGH_WATER and self._transport is not None:
                self._reading_paused = True
                self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._error = exc
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return  # nobody is waiting: the next wait arms the timer again
        if self._loop.time() >= deadline:
            waiter.set_exception(httpcore.ReadTimeout("no data in time"))
        else:  # data came meanwhile and a later read is waiting: look again at its deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    # httpcore.AsyncNetworkStream -----------------------------------------------------------

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if not self._buffer and not self._eof and not self._lost:
            waiter = self._loop.create_future()
            self._waiter = waiter
            if timeout is None:
                self._deadline = None
            else:
                deadline = self._deadline = self._loop.time() + timeout
                if self._timer is None or self._timer.when() > deadline:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = self._loop.call_at(deadline, self._on_timer)
            try:
                await waiter
            finally:
                self._waiter = None
        buffer = self._buffer
        if not buffer:
            if self._error is not None:
                raise httpcore.ReadError(str(self._error) or type(self._error).__name__)
            return b""  # end of stream
        if len(buffer) <= max_bytes:
            self._buffer = b""
            data = buffer if isinstance(buffer, bytes) else bytes(buffer)
        else:
            data = bytes(buffer[:max_bytes])
            self._buffer = buffer[max_bytes:]
        if self._reading_paused and len(self._buffer) < _LOW_WATER and not self._lost:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        transport.write(buffer)
        if not self._writing_paused:
            return
        self._drain = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._drain
        except TimeoutError:
            raise httpcore.WriteTimeout("could not send in time") from None
        finally:
            self._drain = None
        if self._lost:
            raise httpcore.WriteError("the connection broke")

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            if self._tls:
                self._transport.abort()  # no close_notify exchange, as httpcore's anyio backend
            else:
                self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        assert self._transport is not None
        try:
            async with asyncio.timeout(timeout):
                transport = await self._loop.start_tls(
                    self._transport, self, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            await self.aclose()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (ssl.SSLError, OSError) as e:
            await self.aclose()
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        if transport is None:  # pragma: no cover - only when the loop is closing
            raise httpcore.ConnectError("TLS could not be started")
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = True
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        if transport is None:
            return None
        match info:
            case "ssl_object":
                return transport.get_extra_info("ssl_object")
            case "client_addr":
                return transport.get_extra_info("sockname")
            case "server_addr":
                return transport.get_extra_info("peername")
            case "socket":
                return transport.get_extra_info("socket")
            case "is_readable":  # asked of an idle pooled connection: did the server close it?
                if self._buffer or self._eof or self._lost:
                    return True
                sock = transport.get_extra_info("socket")
                if sock is None or sock.fileno() < 0:
                    return True
                poll = select.poll()
                poll.register(sock.fileno(), select.POLLIN)
                return bool(poll.poll(0))
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens `AsyncioStream`s; connection failures are httpcore's typed errors, as with anyio."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        sock = await _connect(loop, host, port, deadline, local_address)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            _, stream = await loop.create_connection(lambda: AsyncioStream(loop), sock=sock)
        except OSError as e:
            sock.close()
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        return stream

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    deadline: float | None,
    local_address: str | None,
) -> socket.socket:
    """A connected non-blocking socket to the first of the host's addresses that answers.

    A connection the kernel completed counts even when the deadline passed before the loop got
    to it: a busy loop (seconds of lag under overload) is not an unreachable backend.
    """
    errors: list[OSError] = []
    try:
        async with asyncio.timeout_at(deadline):
            try:  # an IP address needs no lookup
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )
            except socket.gaierror:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise httpcore.ConnectTimeout("name lookup timed out") from None
    except OSError as e:
        raise httpcore.ConnectError(str(e) or type(e).__name__) from e
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            if local_address:
                sock.bind((local_address, 0))
            async with asyncio.timeout_at(deadline):
                await loop.sock_connect(sock, address)
            return sock
        except TimeoutError:
            if _connected(sock):
                return sock
            sock.close()
            raise httpcore.ConnectTimeout("connect timed out") from None
        except OSError as e:
            sock.close()
            errors.append(e)
        except BaseException:
            sock.close()
            raise
    message = "; ".join(dict.fromkeys(str(e) or type(e).__name__ for e in errors))
    raise httpcore.ConnectError(message or "no address") from (errors[0] if errors else None)


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


# httpcore's errors as httpx's (the same names; the most specific class first).
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _as_httpx(error: Exception) -> Exception:
    for source, target in _ERRORS:
        if isinstance(error, source):
            return target(str(error))
    return error


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as e:
            mapped = _as_httpx(e)
            if mapped is e:
                raise
            raise mapped from e

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class AsyncioTransport(httpx.AsyncBaseTransport):
    """httpx transport: httpcore's HTTP/1.1 connection pool on `AsyncioBackend`."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
    ) -> None:
        limits = limits or httpx.Limits()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core_request)
        except Exception as e:
            mapped = _as_httpx(e)
            if mapped is e:
                raise
            raise mapped from e
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
