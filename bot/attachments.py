"""What people attach, made into what a model reads: images scaled down and encoded, text and PDF
files as text — and a short line, in words, for each file that cannot be used.

Downloads run side by side, each with the size cap and a timeout; decoding and scaling run in a
worker thread, so a large photo or PDF never holds up other turns.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

import charset_normalizer
import PIL.Image
import PIL.ImageOps
import pypdf

from bot.backends.base import Image
from bot.errors import AttachmentUnavailable
from bot.markdown import clean_text
from bot.turn import Attachment

log = logging.getLogger(__name__)

Kind = Literal["image", "text", "pdf"]

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"})
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/x-sh",
        "application/sql",
        "application/x-ndjson",
    }
)
# source code and configuration that platforms often label application/octet-stream
TEXT_SUFFIXES = frozenset(
    [
        ".txt",
        ".md",
        ".rst",
        ".csv",
        ".tsv",
        ".json",
        ".jsonl",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".conf",
        ".log",
        ".xml",
        ".html",
        ".htm",
        ".css",
        ".scss",
        ".py",
        ".pyi",
        ".js",
        ".mjs",
        ".ts",
        ".tsx",
        ".jsx",
        ".go",
        ".rs",
        ".java",
        ".kt",
        ".kts",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".cs",
        ".rb",
        ".php",
        ".sh",
        ".bash",
        ".zsh",
        ".fish",
        ".ps1",
        ".sql",
        ".swift",
        ".scala",
        ".lua",
        ".r",
        ".pl",
        ".hs",
        ".ex",
        ".exs",
        ".erl",
        ".clj",
        ".dart",
        ".vue",
        ".svelte",
        ".tf",
        ".proto",
        ".graphql",
        ".gradle",
        ".cmake",
        ".mk",
        ".diff",
        ".patch",
        ".tex",
        ".env",
        ".properties",
    ]
)
TEXT_NAMES = frozenset({"Dockerfile", "Makefile", "Procfile", "Gemfile", "Justfile"})
MAX_PIXELS = 40_000_000  # decoding more would be a decompression bomb, not a photo


@dataclass(frozen=True)
class Limits:
    count: int  # files read per message
    bytes: int  # per file
    file_chars: int  # text of one file given to the model
    timeout: float  # seconds to download one file
    image_side: int  # pixels: larger images are scaled down to this on the long side


@dataclass(frozen=True)
class Prepared:
    """What a message's attachments give the model, and what the reply must say about them."""

    files: tuple[str, ...] = ()  # each a fenced block under the file's name
    images: tuple[Image, ...] = ()
    notes: tuple[str, ...] = ()  # one short line per file that could not be used (whole)

    def text(self, question: str) -> str:
        """The person's message with the files' text after it."""
        return "\n\n".join(part for part in (question, *self.files) if part.strip())


def kind_of(name: str, media_type: str) -> Kind | None:
    """What a file is, from its type (as the platform says) or else its name."""
    media_type = media_type.split(";")[0].strip().lower()
    path = PurePath(name)
    if media_type in IMAGE_TYPES:
        return "image"
    if media_type == "application/pdf" or path.suffix.lower() == ".pdf":
        return "pdf"
    if media_type.startswith("text/") or media_type in TEXT_TYPES:
        return "text"
    if path.suffix.lower() in TEXT_SUFFIXES or path.name in TEXT_NAMES:
        return "text"
    if not media_type and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".webp"):
        return "image"
    return None


async def prepare(attachments: tuple[Attachment, ...], limits: Limits) -> Prepared:
    """Download and read a message's attachments, side by side; never raises."""
    if not attachments:
        return Prepared()
    taken = attachments[: limits.count]
    notes: list[str] = []
    if len(attachments) > len(taken):
        skipped = ", ".join(f"`{_name(a)}`" for a in attachments[len(taken) :])
        notes.append(f"I read only the first {len(taken)} attachments; not {skipped}.")
    files: list[str] = []
    images: list[Image] = []
    for outcome in await asyncio.gather(*(_one(a, limits) for a in taken)):
        if isinstance(outcome, Image):
            images.append(outcome)
        elif isinstance(outcome, _Note):
            notes.append(outcome.text)
        else:
            block, note = outcome
            files.append(block)
            if note:
                notes.append(note)
    return Prepared(tuple(files), tuple(images), tuple(notes))


@dataclass(frozen=True)
class _Note:
    text: str


async def _one(attachment: Attachment, limits: Limits) -> Image | _Note | tuple[str, str]:
    name = _name(attachment)
    kind = kind_of(attachment.name, attachment.media_type)
    if kind is None:
        shown = attachment.media_type.split(";")[0].strip() or "unknown"
        return _Note(f"`{name}`: I can't read files of this type ({shown[:60]}).")
    if attachment.size is not None and attachment.size > limits.bytes:
        return _Note(f"`{name}` is {_size(attachment.size)}; the limit is {_size(limits.bytes)}.")
    try:
        data = await asyncio.wait_for(attachment.read(limits.bytes), limits.timeout)
    except TimeoutError:
        return _Note(f"`{name}` took too long to download (over {limits.timeout:.0f} s).")
    except AttachmentUnavailable as e:
        return _Note(f"`{name}`: {e.reason}")
    except Exception as e:  # the platform's download failed: say so, answer the rest
        log.warning("downloading an attachment failed: %s: %s", type(e).__name__, e)
        return _Note(f"`{name}` could not be downloaded.")
    if len(data) > limits.bytes:
        return _Note(f"`{name}` is over the limit of {_size(limits.bytes)}.")
    try:
        match kind:
            case "image":
                return await asyncio.to_thread(image_for_model, data, limits.image_side)
            case "pdf":
                text = await asyncio.to_thread(pdf_text, data, limits.file_chars)
                if not text.strip():
                    return _Note(f"`{name}` has no text I can read (a scan?).")
            case _:
                text = await asyncio.to_thread(decoded_text, data)
    except Unreadable as e:
        return _Note(f"`{name}`: {e}")
    return file_block(name, text, limits.file_chars)


class Unreadable(Exception):
    """A file that is not what its type says (or is too much to decode); the words say why."""


def image_for_model(data: bytes, max_side: int) -> Image:
    """The image as vision models take it: upright, at most `max_side` pixels on its long side
    (vision models see no more), JPEG — or PNG where it really is transparent (a screenshot
    saved with an alpha channel that is opaque everywhere is a JPEG: a third of the bytes)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise Unreadable("this image has too many pixels to read.")
            opened.draft("RGB", (max_side, max_side))  # a JPEG decodes at a fraction of its size
            picture = PIL.ImageOps.exif_transpose(opened)  # the first frame of an animation
            picture.thumbnail((max_side, max_side))
            if picture.mode in ("RGBA", "LA", "PA", "P") or "transparency" in picture.info:
                picture = picture.convert("RGBA")
            lowest = picture.getchannel("A").getextrema()[0] if picture.mode == "RGBA" else 255
            clear = isinstance(lowest, int | float) and lowest < 255
            out = io.BytesIO()
            if clear:
                picture.save(out, "PNG")
            else:
                picture.convert("RGB").save(out, "JPEG", quality=85)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise Unreadable("this is not an image I can read.") from e
    media_type = "image/png" if clear else "image/jpeg"
    return Image(media_type, base64.b64encode(out.getvalue()).decode("ascii"))


def decoded_text(data: bytes) -> str:
    """A text file's text, whatever its encoding; bad bytes never fail it.

    UTF-8 (with or without a BOM) as it is, else the encoding charset-normalizer detects —
    preferring Windows-1252, the commonest legacy encoding of Western text, over a near tie
    (short French or German text reads as well in a Baltic code page, by its measures).
    """
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise Unreadable("this looks like a binary file, not text.")
    try:
        return clean_text(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        pass
    found = charset_normalizer.from_bytes(data)
    best = found.best()
    if best is None:
        return clean_text(data.decode("utf-8", "replace"))
    western = next((m for m in found if m.encoding == "cp1252"), None)
    if western is not None and western.chaos <= best.chaos + 0.1:
        best = western
    return clean_text(str(best))


def pdf_text(data: bytes, max_chars: int) -> str:
    """A PDF's text, page by page, up to a little past `max_chars`."""
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable("this PDF is protected by a password.")
        pages: list[str] = []
        length = 0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            length += len(pages[-1])
            if length > max_chars:
                break
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many kinds on a broken file
        raise Unreadable("this PDF could not be read.") from e
    return clean_text("\n\n".join(pages))


def file_block(name: str, text: str, max_chars: int) -> tuple[str, str]:
    """The file's text as a fenced block under its name, cut at `max_chars` (and the note that
    says so, for the reply)."""
    note = ""
    text = text.rstrip("\n")
    if len(text) > max_chars:
        note = f"`{name}` is {len(text):,} characters long; I read the first {max_chars:,}."
        text = text[:max_chars] + "\n[… the rest of the file is cut]"
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    language = PurePath(name).suffix.lstrip(".").lower()[:12]
    return f"File `{name}`:\n{fence}{language}\n{text}\n{fence}", note


def _name(attachment: Attachment) -> str:
    """A file's name as the reply shows it: short, on one line, no backticks."""
    name = clean_text(attachment.name).replace("`", "'").replace("\n", " ").strip() or "file"
    return name if len(name) <= 80 else name[:79] + "…"


def _size(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1_000_000:.1f} MB".replace(".0 MB", " MB")
    return f"{math.ceil(count / 1000)} KB"
