"""Attachments: what people attach reaches the model — images to vision models in each backend's
shape, text and PDF files as text — and every file that cannot be used is said in the reply.

The pure parts are called directly; the whole path runs through the core with a real Redis and
the fake model server, which checks the `images` / `image_url` shapes and refuses images sent to
a model whose `capabilities` lack `vision`, as Ollama does.
"""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import redis.asyncio as aioredis

from adapters.console import ConsoleAdapter
from bot.app import Parley
from bot.attachments import (
    Limits,
    Unreadable,
    decoded_text,
    file_block,
    image_for_model,
    kind_of,
    pdf_text,
    prepare,
)
from bot.conversation import Outcome
from bot.errors import AttachmentUnavailable
from bot.turn import Attachment, ConversationKey, Turn
from tests.fakes.model_server import FakeModelServer
from tests.sinks import RecordingSink
from tests.support import make_settings

LATIN = "Le café est très bon, mais la crème brûlée était déjà froide à l'arrivée. " * 3
VISION = "gemma3:4b"  # the fake's vision model (capabilities: completion, vision)
LIMITS = Limits(count=3, bytes=200_000, file_chars=500, timeout=1.0, image_side=256)


def png(width: int = 640, height: int = 480, *, alpha: bool = False) -> bytes:
    picture = PIL.Image.new("RGBA" if alpha else "RGB", (width, height), (200, 30, 30, 128))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def text_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer says `text` (written out by hand: a few objects)."""
    stream = f"BT /F1 18 Tf 40 700 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    table = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        table,
    )
    return bytes(out)


def attached(
    name: str,
    data: bytes,
    media_type: str = "",
    *,
    size: int | None = -1,
    read: Callable[[int], Awaitable[bytes]] | None = None,
) -> Attachment:
    async def reading(limit: int) -> bytes:
        return data[: limit + 1]

    return Attachment(name, media_type, len(data) if size == -1 else size, read or reading)


# --- what a file is, and what it becomes ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "media_type", "kind"),
    [
        ("photo.jpg", "image/jpeg", "image"),
        ("shot.png", "", "image"),
        ("notes.txt", "text/plain; charset=utf-8", "text"),
        ("main.py", "application/octet-stream", "text"),
        ("data.json", "application/json", "text"),
        ("Dockerfile", "", "text"),
        ("paper.pdf", "application/pdf", "pdf"),
        ("paper.PDF", "", "pdf"),
        ("archive.zip", "application/zip", None),
        ("movie.mp4", "video/mp4", None),
    ],
)
def test_a_file_is_known_by_its_type_or_else_its_name(
    name: str, media_type: str, kind: str | None
) -> None:
    assert kind_of(name, media_type) == kind


def test_a_large_photo_is_scaled_down_to_what_vision_models_use() -> None:
    image = image_for_model(png(4000, 3000), 1568)
    assert image.media_type == "image/jpeg"
    with PIL.Image.open(io.BytesIO(base64.b64decode(image.data))) as seen:
        assert seen.size == (1568, 1176)  # the long side capped, the proportions kept
    assert len(image.data) < len(base64.b64encode(png(4000, 3000)))


def test_a_transparent_image_stays_a_png_and_a_small_one_keeps_its_size() -> None:
    image = image_for_model(png(100, 50, alpha=True), 1568)
    assert image.media_type == "image/png"
    with PIL.Image.open(io.BytesIO(base64.b64decode(image.data))) as seen:
        assert seen.size == (100, 50)


def test_a_screenshot_with_an_opaque_alpha_channel_is_sent_as_a_jpeg() -> None:
    opaque = io.BytesIO()
    PIL.Image.new("RGBA", (300, 200), (10, 20, 30, 255)).save(opaque, "PNG")
    assert image_for_model(opaque.getvalue(), 1568).media_type == "image/jpeg"


@pytest.mark.parametrize("data", [b"", b"not an image at all", png()[:100]])
def test_bytes_that_are_no_image_are_unreadable_not_a_crash(data: bytes) -> None:
    with pytest.raises(Unreadable):
        image_for_model(data, 1568)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("naïve café".encode(), "naïve café"),
        (LATIN.encode("latin-1"), LATIN),
        ("\ufeffhello".encode("utf-8"), "hello"),
        ("hello world".encode("utf-16"), "hello world"),
        (b"ok \xff\xfe\x80 still ok", None),  # bad bytes: decoded somehow, never a crash
    ],
)
def test_text_files_are_decoded_whatever_their_encoding(data: bytes, text: str | None) -> None:
    decoded = decoded_text(data)
    if text is not None:
        assert decoded.strip() == text.strip()
    decoded.encode("utf-8")


def test_a_binary_file_named_as_text_is_said_to_be_binary() -> None:
    with pytest.raises(Unreadable, match="binary"):
        decoded_text(b"\x7fELF\x00\x00\x00\x02" * 100)


def test_a_pdfs_text_is_read_and_a_broken_pdf_is_unreadable() -> None:
    assert "Quarterly numbers are up" in pdf_text(text_pdf("Quarterly numbers are up"), 1000)
    with pytest.raises(Unreadable, match="could not be read"):
        pdf_text(b"%PDF-1.4 garbage", 1000)


def test_a_long_file_is_cut_with_a_note_and_fenced_safely() -> None:
    block, note = file_block("log.txt", "```\n" + "x" * 1000, 500)
    assert block.startswith("File `log.txt`:\n````txt\n```")  # a fence longer than any inside
    assert block.endswith("[… the rest of the file is cut]\n````")
    assert note == "`log.txt` is 1,004 characters long; I read the first 500."


async def test_each_file_that_cannot_be_used_is_named_and_the_rest_is_read() -> None:
    async def slow(limit: int) -> bytes:
        await asyncio.sleep(5)
        return b""

    async def refused(limit: int) -> bytes:
        raise AttachmentUnavailable("Slack did not let me download it.")

    async def broken(limit: int) -> bytes:
        raise ConnectionResetError("reset by peer")

    prepared = await prepare(
        (
            attached("ok.txt", b"fine text", "text/plain"),
            attached("big.png", png(), "image/png", size=10_000_000),
            attached("clip.mp4", b"....", "video/mp4"),
            attached("more.txt", b"x", "text/plain"),  # the fourth: over the count of three
        ),
        LIMITS,
    )
    assert prepared.files == ("File `ok.txt`:\n```txt\nfine text\n```",)
    assert prepared.notes == (
        "I read only the first 3 attachments; not `more.txt`.",
        "`big.png` is 10 MB; the limit is 200 KB.",
        "`clip.mp4`: I can't read files of this type (video/mp4).",
    )
    failing = await prepare(
        (
            attached("slow.txt", b"", "text/plain", read=slow),
            attached("private.png", b"", "image/png", read=refused),
            attached("cut.txt", b"", "text/plain", read=broken),
            attached("unsized.txt", b"y" * 300_000, "text/plain", size=None),
        ),
        Limits(count=4, bytes=200_000, file_chars=500, timeout=0.2, image_side=256),
    )
    assert failing.notes == (
        "`slow.txt` took too long to download (over 0 s).",
        "`private.png`: Slack did not let me download it.",
        "`cut.txt` could not be downloaded.",
        "`unsized.txt` is over the limit of 200 KB.",
    )
    assert failing.files == () and failing.images == ()


# --- the whole path -------------------------------------------------------------------------


KEY = ConversationKey("slack", "T1", "C1", "1700000000.000100")


def asking(text: str, *files: Attachment) -> Turn:
    return Turn(KEY, "U1", "ada", text, uuid.uuid4().hex, attachments=files)


@pytest.fixture
async def model_server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer(["llama3.2:latest", VISION]) as fake:
        yield fake


async def open_parley(redis_url: str, model_server: FakeModelServer, **extra: Any) -> Parley:
    return await Parley.open(make_settings(redis_url, model_server, **extra))


@pytest.fixture
async def parley(redis_url: str, model_server: FakeModelServer) -> AsyncIterator[Parley]:
    app = await open_parley(redis_url, model_server)
    yield app
    await app.aclose()


async def test_an_image_reaches_a_vision_model_and_follow_ups_still_see_it(
    parley: Parley, model_server: FakeModelServer
) -> None:
    await parley.conversation.command(asking(""), "model", VISION)
    sink = RecordingSink()
    photo = attached("chart.png", png(3000, 2000), "image/png")
    assert await parley.conversation.handle(asking("what is this?", photo), sink) is (
        Outcome.COMPLETE
    )
    assert sink.messages == ["You said: what is this?"]
    (sent,) = model_server.images_seen[-1]
    with PIL.Image.open(io.BytesIO(base64.b64decode(sent))) as seen:
        assert max(seen.size) == 1568  # scaled down before it left
    user = model_server.chat_requests[-1]["messages"][-1]
    assert user["images"] == [sent] and not sent.startswith("data:")  # Ollama's own shape

    follow_up = RecordingSink()
    await parley.conversation.handle(asking("and the colours?"), follow_up)
    assert model_server.images_seen[-1] == [sent]  # from Redis, not downloaded again
    earlier, newest = model_server.chat_requests[-1]["messages"][-3::2]
    assert earlier["images"] == [sent] and "images" not in newest


async def test_a_model_that_cannot_see_answers_the_text_and_says_which_can(
    parley: Parley, model_server: FakeModelServer
) -> None:
    sink = RecordingSink()
    photo = attached("cat.jpg", png(), "image/jpeg")
    assert await parley.conversation.handle(asking("describe it", photo), sink) is (
        Outcome.COMPLETE
    )
    assert model_server.images_seen[-1] == []  # nothing sent it cannot take
    assert sink.messages[-1] == (
        "You said: describe it\n\n📎 `llama3.2:latest` can't see images: I answered the text."
        f" Models that can: `{VISION}` (`model <name>`)."
    )
    listing = await parley.conversation.command(asking(""), "model", "")
    assert f"`{VISION}` 👁 sees images" in listing.text
    assert "`llama3.2:latest` 👁" not in listing.text


async def test_the_vision_model_answers_a_turn_with_images_where_the_channels_cannot_see(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await open_parley(redis_url, model_server, vision_model=VISION)
    try:
        sink = RecordingSink()
        await app.conversation.handle(asking("what is it?", attached("a.png", png())), sink)
    finally:
        await app.aclose()
    assert model_server.chat_requests[-1]["model"] == VISION
    assert len(model_server.images_seen[-1]) == 1
    assert sink.messages[-1].endswith(
        f"📎 `llama3.2:latest` can't see images, so `{VISION}` answered this."
    )


async def test_an_openai_compatible_server_gets_data_url_image_parts(
    redis_url: str, model_server: FakeModelServer
) -> None:
    app = await Parley.open(
        make_settings(
            redis_url,
            model_server,
            backends=[{"name": "box", "kind": "openai", "url": model_server.url}],
            default_model=VISION,
            vision_models="gemma3*",
        )
    )
    try:
        sink = RecordingSink()
        photo = attached("a.png", png(), "image/png")
        assert await app.conversation.handle(asking("look", photo), sink) is Outcome.COMPLETE
    finally:
        await app.aclose()
    content = model_server.chat_requests[-1]["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "look"}
    assert content[1]["type"] == "image_url"
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert len(model_server.images_seen[-1]) == 1


async def test_text_and_pdf_files_reach_the_model_as_text_and_failures_are_said(
    parley: Parley, model_server: FakeModelServer
) -> None:
    sink = RecordingSink()
    files = (
        attached("notes.md", b"# Plan\nship it", "text/markdown"),
        attached("report.pdf", text_pdf("Revenue grew four percent"), "application/pdf"),
        attached("setup.exe", b"MZ\x90\x00", "application/x-msdownload"),
    )
    await parley.conversation.handle(asking("summarise", *files), sink)
    sent = model_server.chat_requests[-1]["messages"][-1]["content"]
    assert sent.startswith("summarise\n\nFile `notes.md`:\n```md\n# Plan\nship it\n```")
    assert "File `report.pdf`:\n```pdf\nRevenue grew four percent" in sent
    assert sink.messages[-1].endswith(
        "📎 `setup.exe`: I can't read files of this type (application/x-msdownload)."
    )
    # a follow-up still has the files' text: it was remembered with the question
    await parley.conversation.handle(asking("and the risks?"), RecordingSink())
    assert "Revenue grew four percent" in model_server.chat_requests[-1]["messages"][1]["content"]


async def test_a_thread_keeps_only_its_newest_images_within_the_caps(
    redis_url: str, model_server: FakeModelServer, redis_client: aioredis.Redis
) -> None:
    app = await open_parley(redis_url, model_server, thread_images=2, default_model=VISION)
    try:
        for n in range(3):
            photo = attached(f"{n}.png", png(64 + n, 64), "image/png")
            await app.conversation.handle(asking(f"photo {n}", photo), RecordingSink())
    finally:
        await app.aclose()
    stored = await redis_client.hgetall(f"parley:img:{{{KEY.tag}}}")
    assert len(stored) == 2  # the oldest went first
    assert await redis_client.ttl(f"parley:img:{{{KEY.tag}}}") > 0  # lapses with the thread
    # and the newest request carried only as many: its own and the one before
    assert len(model_server.images_seen[-1]) == 2


async def test_a_threads_images_go_when_no_remembered_message_names_them(
    redis_url: str, model_server: FakeModelServer, redis_client: aioredis.Redis
) -> None:
    app = await open_parley(redis_url, model_server, history_max_messages=4, default_model=VISION)
    try:
        await app.conversation.handle(asking("see", attached("a.png", png())), RecordingSink())
        for n in range(3):  # the exchange with the image leaves the four kept messages
            await app.conversation.handle(asking(f"talk {n}"), RecordingSink())
    finally:
        await app.aclose()
    assert await redis_client.hlen(f"parley:img:{{{KEY.tag}}}") == 0
    assert model_server.images_seen[-1] == []


async def test_the_console_attaches_local_files_to_the_next_message(
    parley: Parley, model_server: FakeModelServer, tmp_path: Path
) -> None:
    (tmp_path / "todo.txt").write_text("buy milk")
    out = io.StringIO()
    console = ConsoleAdapter(parley, stdin=io.StringIO(), stdout=out, interactive=False)
    console.attach(str(tmp_path / "todo.txt"))
    console.attach(str(tmp_path / "missing.txt"))
    await console.say("what is on the list?")
    assert (
        "File `todo.txt`:\n```txt\nbuy milk\n```"
        in (model_server.chat_requests[-1]["messages"][-1]["content"])
    )
    assert "attached todo.txt" in out.getvalue() and "no file at" in out.getvalue()
    await console.say("thanks")  # the attachment went with one message only
    assert "todo.txt" not in model_server.chat_requests[-1]["messages"][-1]["content"]
