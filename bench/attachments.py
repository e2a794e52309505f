"""Attachments: what an image adds to a turn, and the Redis memory a thread's images take.

    python -m bench.attachments [--quick] [--turns 20] [--follow-ups 10] [--ttft 0.5]

Parley's real core in-process (`Parley.open`, `conversation.handle`), a real redis-server, the
fake platform with a 50 ms round trip and no rate limits (so only Parley's own costs differ
between rows), and a vision-capable fake Ollama in its own process (`--model-server`, below).

1. One image per turn, each turn in a new thread, against the same question without an image:
   noisy JPEG photos of 0.3, 2 and 12 megapixels (texture and sensor-like noise, so they
   compress like photos, not flat test images: 0.26–0.29 bytes per pixel) and a 1920×1080 PNG
   screenshot (text, panels), as RGB and as RGBA with every pixel opaque. The kinds take turns
   in a rotating order, `--turns` rounds after one round of warm-up. Per turn: event → the model
   server has the whole request (its stamp), event → first visible answer text, event → done,
   Parley's CPU (this process: the core, its worker threads, the fake platform), and the
   request body's bytes as the model server read them.
2. Preparing one image, apart from the turn: `bot.attachments.image_for_model` in a worker thread
   (as the core runs it) while the event loop ticks every 1 ms (its largest lag), then the same
   steps timed one by one in this thread: decode, orient and scale, encode, base64.
3. One thread that is sent photos (12 MP each) until it has had 1, 4, 8 and 12, then 25 text
   turns more, and one sent 8 RGBA screenshots: at each stage `MEMORY USAGE … SAMPLES 0` of its
   image hash and history list, text follow-ups (timed, as in 1), and one more follow-up through
   the counting TCP proxy of `bench.redis_turn` for the bytes and round trips it costs in Redis.

The fake model server is this bench's own, not the tests' `FakeModelServer`: that one is an
aiohttp app with aiohttp's default 1 MiB request body cap (it answers 413 to a follow-up that
carries three photos, or to one RGBA screenshot), keeps every request body, and in-process would
charge its JSON and base64 work to Parley's CPU; `bench.fake_backend` has no `/api/show`, so Parley
would take its models as blind. This one answers `/api/tags`, `/api/show` (`capabilities` with
`vision` for gemma3:4b), and `/api/chat`: it reads and parses the body, checks every image is
plain base64, stamps when it had the request, streams `--tokens` pieces after `--ttft`, and
records the body's size and image count (`GET /bench/requests`). It does not model the vision
encoder's own time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import signal
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps
import redis.asyncio as aioredis
from aiohttp import web

from bench.common import (
    cpu_seconds,
    ms,
    parley,
    percentile,
    print_machine,
    print_table,
    redis_server,
    run_like_parley,
    settings,
)
from bench.platform import NO_LIMITS, FakePlatform, ReplyRecord
from bench.redis_turn import CountingProxy, bursts_text
from bot.app import Parley
from bot.attachments import image_for_model
from bot.state import HistoryEntry
from bot.turn import Attachment, ConversationKey, Turn

VISION = "gemma3:4b"
QUESTION = "What is in this picture, and is anything wrong with it?"
FOLLOW_UP = "And what would you change first?"
IMAGE_SIDE = 1568  # the core's default PARLEY_IMAGE_MAX_SIDE
KIB = 1024
T = TypeVar("T")


# --- the images -------------------------------------------------------------------------------


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG that compresses like a camera photo: smooth colour, texture a few pixels across
    (which survives scaling down) and per-pixel noise, saved at quality 90."""
    rnd = random.Random(seed)
    small = PIL.Image.new("RGB", (24, 18))
    small.putdata(
        [(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(432)]
    )
    picture = small.resize((width, height), PIL.Image.Resampling.BICUBIC)

    def noise(size: tuple[int, int]) -> PIL.Image.Image:
        return PIL.Image.merge("RGB", [PIL.Image.effect_noise(size, 64) for _ in range(3)])

    texture = noise((width // 3, height // 3)).resize((width, height), PIL.Image.Resampling.BICUBIC)
    picture = PIL.Image.blend(picture, texture, 0.15)
    picture = PIL.Image.blend(picture, noise((width, height)), 0.08)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=90)
    return out.getvalue()


WORDS = (
    "the reply thread model image redis turn stream queue worker deploy config error retry "
    "channel message budget latency token backend cache review"
)


def screenshot(width: int, height: int, seed: int, *, alpha: bool) -> bytes:
    """A PNG like a screenshot of a busy app: a title bar, a sidebar, lines of text, some
    coloured panels; with `alpha`, an RGBA image whose every pixel is opaque."""
    rnd = random.Random(seed)
    words = WORDS.split()
    picture = PIL.Image.new("RGBA" if alpha else "RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(picture)
    font = PIL.ImageFont.load_default(size=14)
    draw.rectangle((0, 0, width, 40), fill=(40, 44, 52))
    draw.rectangle((0, 40, 260, height), fill=(245, 246, 248))
    for y in range(60, height - 20, 22):
        draw.text((16, y), " ".join(rnd.choices(words, k=3)), fill=(60, 60, 60), font=font)
    for y in range(60, height - 20, 20):
        x = 290.0
        while x < width - 200:
            line = " ".join(rnd.choices(words, k=rnd.randrange(3, 9)))
            ink = (20, 20, 20) if rnd.random() < 0.8 else (30, 90, 200)
            draw.text((x, y), line, fill=ink, font=font)
            x += draw.textlength(line, font=font) + rnd.randrange(20, 200)
    for _ in range(4):
        x, y = rnd.randrange(300, width - 400), rnd.randrange(80, height - 300)
        colour = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
        draw.rectangle((x, y, x + rnd.randrange(150, 380), y + rnd.randrange(100, 260)), colour)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


@dataclass(frozen=True)
class Sample:
    label: str
    name: str
    media_type: str
    data: bytes
    size: tuple[int, int]

    def attachment(self) -> Attachment:
        data = self.data

        async def read(limit: int) -> bytes:  # as a platform download: at most limit + 1 bytes
            return data[: limit + 1]

        return Attachment(self.name, self.media_type, len(data), read)


def samples() -> list[Sample]:
    def jpeg(label: str, width: int, height: int) -> Sample:
        data = photo(width, height, width)
        return Sample(label, "photo.jpg", "image/jpeg", data, (width, height))

    def png(label: str, alpha: bool) -> Sample:
        data = screenshot(1920, 1080, 7, alpha=alpha)
        return Sample(label, "screenshot.png", "image/png", data, (1920, 1080))

    return [
        jpeg("photo 0.3 MP", 640, 480),
        jpeg("photo 2 MP", 1632, 1224),
        jpeg("photo 12 MP", 4032, 3024),
        png("screenshot PNG", alpha=False),
        png("screenshot PNG+alpha", alpha=True),
    ]


# --- the fake model server (its own process) --------------------------------------------------


class VisionModelServer:
    """Ollama's /api/tags, /api/show and streaming /api/chat for one vision model (module doc)."""

    def __init__(self, ttft: float, tokens: int, interval: float) -> None:
        self.ttft = ttft
        self.tokens = tokens
        self.interval = interval
        self.seen: list[dict[str, int]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)  # Ollama reads whole bodies
        app.router.add_get("/api/tags", self.tags)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_get("/bench/requests", self.requests)
        return app

    async def tags(self, request: web.Request) -> web.Response:
        model = {"name": VISION, "model": VISION, "modified_at": "2025-05-04T17:37:44-07:00"}
        return web.json_response({"models": [model]})

    async def show(self, request: web.Request) -> web.Response:
        data = await request.json()
        if data.get("model") != VISION:
            return web.json_response(
                {"error": f"model '{data.get('model')}' not found"}, status=404
            )
        details = {"family": "gemma3", "families": ["gemma3"], "parameter_size": "4.3B"}
        return web.json_response({"capabilities": ["completion", "vision"], "details": details})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        data = json.loads(body)
        if data.get("model") != VISION:
            return web.json_response(
                {"error": f"model '{data.get('model')}' not found"}, status=404
            )
        images = [i for m in data["messages"] for i in m.get("images") or ()]
        try:
            for image in images:
                base64.b64decode(image, validate=True)  # Go decodes them into []byte
        except ValueError:
            return web.json_response({"error": "illegal base64 data at input byte 4"}, status=400)
        received = time.time()
        self.seen.append({"bytes": len(body), "images": len(images)})
        await asyncio.sleep(self.ttft)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for n in range(self.tokens):
            piece = f" word{n}"
            if n == 0:  # bench.platform reads it back: request received, first token sent
                piece = f"[[r={received:.6f},s={time.time():.6f}]]{piece}"
            await response.write(self._line(piece, done=False))
            await asyncio.sleep(self.interval)
        await response.write(self._line("", done=True))
        await response.write_eof()
        return response

    def _line(self, content: str, *, done: bool) -> bytes:
        line: dict[str, Any] = {
            "model": VISION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "message": {"role": "assistant", "content": content},
            "done": done,
        }
        if done:
            line |= {"done_reason": "stop", "eval_count": self.tokens, "eval_duration": 10**8}
        return json.dumps(line, separators=(",", ":")).encode() + b"\n"

    async def requests(self, request: web.Request) -> web.Response:
        seen, self.seen = self.seen, []
        return web.json_response(seen)


async def serve_model(args: argparse.Namespace) -> None:
    server = VisionModelServer(args.ttft, args.tokens, 1 / args.tps)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"URL http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


class ModelProcess:
    """`python -m bench.attachments --model-server` as a child, so its CPU is not Parley's."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.argv = ["--ttft", str(args.ttft), "--tokens", str(args.tokens), "--tps", str(args.tps)]
        self.url = ""
        self.process: asyncio.subprocess.Process | None = None
        self.client = httpx.AsyncClient()

    async def start(self) -> str:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.attachments", "--model-server", *self.argv,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        if not line.startswith(b"URL "):
            raise RuntimeError(f"the model server did not start: {line!r}")
        self.url = line.decode().split()[1]
        return self.url

    async def requests(self) -> list[dict[str, int]]:
        """The chat requests it has had since the last call: body bytes, images."""
        seen: list[dict[str, int]] = (await self.client.get(self.url + "/bench/requests")).json()
        return seen

    async def stop(self) -> None:
        await self.client.aclose()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


# --- one turn ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asked:
    """One turn as measured: seconds from the event, Parley's CPU seconds, the model's request."""

    requested: float  # the model server had the whole request
    visible: float  # the first answer text was shown
    done: float  # handle() returned (the exchange and its images saved)
    cpu: float
    request_bytes: int
    images_sent: int


async def ask(
    app: Parley,
    platform: FakePlatform,
    model: ModelProcess,
    key: ConversationKey,
    text: str,
    image: Sample | None,
    event: str,
) -> Asked:
    files = () if image is None else (image.attachment(),)
    turn = Turn(key, "U1", "ada", text, event, attachments=files)
    record = ReplyRecord(event_at=time.time())
    cpu = cpu_seconds()
    outcome = await app.conversation.handle(turn, platform.sink(key.space, key.channel, record))
    cpu, done = cpu_seconds() - cpu, time.time()
    (seen,) = await model.requests()
    if str(outcome) != "complete" or record.first_visible_at is None or not record.requested_at:
        raise RuntimeError(f"turn {event} ended {outcome}")
    return Asked(
        requested=record.requested_at - record.event_at,
        visible=record.first_visible_at - record.event_at,
        done=done - record.event_at,
        cpu=cpu,
        request_bytes=seen["bytes"],
        images_sent=seen["images"],
    )


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def medians(asked: Sequence[Asked]) -> Asked:
    """Each figure's median over the turns (nearest rank)."""
    return Asked(
        requested=median([a.requested for a in asked]),
        visible=median([a.visible for a in asked]),
        done=median([a.done for a in asked]),
        cpu=median([a.cpu for a in asked]),
        request_bytes=int(median([a.request_bytes for a in asked])),
        images_sent=int(median([a.images_sent for a in asked])),
    )


# --- 1. what an image adds to a turn ----------------------------------------------------------


async def turn_costs(
    app: Parley,
    platform: FakePlatform,
    model: ModelProcess,
    kinds: list[Sample],
    turns: int,
) -> tuple[list[list[object]], dict[str, int]]:
    """Rows of the turn table, and each kind's bytes stored in Redis."""
    labels = ["no image", *(k.label for k in kinds)]
    images: list[Sample | None] = [None, *kinds]
    asked: dict[str, list[Asked]] = {label: [] for label in labels}
    stored: dict[str, int] = {}
    pairs = list(zip(labels, images, strict=True))
    for round_ in range(-1, turns):  # round -1 warms up: scripts, capabilities, Pillow
        shift = round_ % len(pairs)  # each kind in each place of the order as often
        for label, image in pairs[shift:] + pairs[:shift]:
            key = ConversationKey("slack", f"T{round_}", f"C{round_}-{label}", "1.0")
            one = await ask(app, platform, model, key, QUESTION, image, f"t{round_}-{label}")
            if one.images_sent != (image is not None):
                raise RuntimeError(f"{label}: the model got {one.images_sent} images")
            if round_ >= 0:
                asked[label].append(one)
            if image is not None and round_ == turns - 1:
                values = await app.state.redis.hvals(app.state.images_key(key))
                stored[label] = sum(len(v) for v in values)
    base = medians(asked["no image"])
    rows: list[list[object]] = []
    for label in labels:
        mid = medians(asked[label])
        upload = next((len(k.data) for k in kinds if k.label == label), 0)
        rows.append(
            [
                label,
                len(asked[label]),
                upload / KIB,
                mid.request_bytes / KIB,
                ms(mid.requested),
                ms(mid.requested - base.requested),
                ms(mid.visible),
                ms(mid.visible - base.visible),
                f"{mid.visible / base.visible:.2f}x",
                ms(mid.done),
                ms(mid.cpu),
                f"{mid.cpu / base.cpu:.2f}x",
            ]
        )
    return rows, stored


# --- 2. preparing one image -------------------------------------------------------------------


def _timed_in_thread(data: bytes) -> tuple[float, str, tuple[int, int], int]:
    started = time.thread_time()
    image = image_for_model(data, IMAGE_SIDE)
    cpu = time.thread_time() - started
    with PIL.Image.open(io.BytesIO(base64.b64decode(image.data))) as sent:
        size = sent.size
    return cpu, image.media_type, size, len(image.data)


def steps(data: bytes) -> dict[str, float]:
    """image_for_model's steps, one by one, CPU seconds each (the same Pillow calls)."""
    clock = time.thread_time
    t0 = clock()
    opened = PIL.Image.open(io.BytesIO(data))
    opened.load()
    t1 = clock()
    picture = PIL.ImageOps.exif_transpose(opened)
    picture.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    t2 = clock()
    out = io.BytesIO()
    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        picture.convert("RGBA").save(out, "PNG", optimize=True)
    else:
        picture.convert("RGB").save(out, "JPEG", quality=85)
    t3 = clock()
    base64.b64encode(out.getvalue()).decode("ascii")
    t4 = clock()
    opened.close()
    return {"decode": t1 - t0, "scale": t2 - t1, "encode": t3 - t2, "base64": t4 - t3}


async def lag_during(work: Awaitable[T]) -> tuple[T, float]:
    """`work`'s result, and the event loop's largest lag (1 ms sleeps) while it ran."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    worst = 0.0
    while not task.done():
        before = loop.time()
        await asyncio.sleep(0.001)
        worst = max(worst, loop.time() - before - 0.001)
    return await task, worst


async def prepare_costs(
    kinds: list[Sample], repeat: int, stored: dict[str, int]
) -> list[list[object]]:
    rows: list[list[object]] = []
    for kind in kinds:
        cpus, walls, lags = [], [], []
        result: tuple[float, str, tuple[int, int], int] = (0.0, "", (0, 0), 0)
        for _ in range(repeat):
            started = time.perf_counter()
            result, lag = await lag_during(asyncio.to_thread(_timed_in_thread, kind.data))
            walls.append(time.perf_counter() - started)
            cpus.append(result[0])
            lags.append(lag)
        parts = [steps(kind.data) for _ in range(repeat)]
        _, media_type, (width, height), encoded = result
        rows.append(
            [
                kind.label,
                f"{kind.size[0]}×{kind.size[1]}",
                len(kind.data) / KIB,
                f"{width}×{height} {media_type.split('/')[1].upper()}",
                encoded / KIB,
                f"{encoded / len(kind.data):.2f}x",
                stored.get(kind.label, 0) / KIB,
                ms(median(cpus)),
                ms(median(walls)),
                ms(median(lags)),
                *(ms(median([p[step] for p in parts])) for step in parts[0]),
            ]
        )
    return rows


# --- 3. Redis memory per thread ---------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    label: str
    image: Sample | None
    count: int  # images the thread has been sent by then
    chatter: int = 0  # text turns in the thread after them


async def thread_memory(
    app: Parley,
    counted: Parley,
    proxy: CountingProxy,
    platform: FakePlatform,
    model: ModelProcess,
    series: list[list[Stage]],
    follow_ups: int,
) -> tuple[list[list[object]], list[str]]:
    redis: aioredis.Redis = app.state.redis  # type: ignore[assignment]
    rows: list[list[object]] = []
    notes: list[str] = []
    base: Asked | None = None  # the follow-up in a thread without images
    for number, stages in enumerate(series):
        key = ConversationKey("slack", "Tmem", f"Cmem{number}", "1.0")
        await ask(counted, platform, model, key, "hello", None, f"m{number}-hello")
        posted = 0
        for step, stage in enumerate(stages):
            to_redis = 0
            while posted < stage.count:
                before = proxy.traffic.to_server
                await ask(
                    counted, platform, model, key, QUESTION, stage.image, f"m{number}-{posted}"
                )
                to_redis = proxy.traffic.to_server - before
                posted += 1
            for n in range(stage.chatter):
                await ask(
                    app, platform, model, key, "One more thing.", None, f"m{number}-{step}-x{n}"
                )
            images, history = app.state.images_key(key), app.state.history_key(key)
            kept = [_str(i) for i in await redis.hkeys(images)]
            entries = [HistoryEntry.from_json(_str(e)) for e in await redis.lrange(history, 0, -1)]
            named = {i for e in entries if e is not None for i in e.images}
            held = [
                len(kept),
                sum(1 for i in kept if i in named),
                (await redis.memory_usage(images, samples=0) or 0) / KIB,
                sum(len(v) for v in await redis.hvals(images)) / KIB,
                (await redis.memory_usage(history, samples=0) or 0) / KIB,
                len(entries),
                to_redis / KIB if to_redis else "–",
            ]
            mid = medians(
                [
                    await ask(app, platform, model, key, FOLLOW_UP, None, f"m{number}-{step}-{n}")
                    for n in range(follow_ups)
                ]
            )
            # the same follow-up once more, through the counting proxy
            traffic = proxy.traffic
            first = len(traffic.bursts)
            rt0, _, _, up0, down0, _ = traffic.snapshot()
            await ask(counted, platform, model, key, FOLLOW_UP, None, f"m{number}-{step}-c")
            rt1, _, _, up1, down1, _ = traffic.snapshot()
            base = base or mid
            rows.append(
                [
                    stage.label,
                    stage.count,
                    *held,
                    (down1 - down0) / KIB,
                    (up1 - up0) / KIB,
                    rt1 - rt0,
                    mid.images_sent,
                    mid.request_bytes / KIB,
                    ms(mid.visible),
                    ms(mid.visible - base.visible),
                    ms(mid.cpu),
                    f"{mid.cpu / base.cpu:.2f}x",
                ]
            )
            notes.append(f"{stage.label} ({stage.count}): {bursts_text(traffic.bursts[first:])}")
    return rows, notes


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- the run ----------------------------------------------------------------------------------


async def measure(args: argparse.Namespace) -> None:
    print_machine()
    started = time.perf_counter()
    kinds = samples()
    print(f"images generated in {time.perf_counter() - started:.1f} s")
    print(
        f"model: {VISION}, TTFT {args.ttft * 1000:.0f} ms, {args.tokens} tokens at {args.tps} "
        f"tokens/s; platform round trip {args.latency * 1000:.0f} ms, no rate limits; "
        f"image side {IMAGE_SIDE} px\n"
    )
    model = ModelProcess(args)
    await model.start()
    try:
        async with redis_server() as redis_url:
            port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
            proxy = CountingProxy(port)
            proxy_url = await proxy.start()
            common: dict[str, Any] = {"default_model": VISION, "redis_prefix": "att:"}
            platform = FakePlatform(NO_LIMITS, latency=args.latency)
            try:
                async with (
                    parley(settings(redis_url, [model.url], **common)) as app,
                    parley(settings(proxy_url, [model.url], **common)) as counted,
                ):
                    turn_rows, stored = await turn_costs(app, platform, model, kinds, args.turns)
                    prepare_rows = await prepare_costs(kinds, args.repeat, stored)
                    by_label = {k.label: k for k in kinds}
                    photos = [
                        Stage("none", None, 0),
                        *(Stage("photos 12 MP", by_label["photo 12 MP"], n) for n in args.stages),
                        Stage("then 25 text turns", None, args.stages[-1], chatter=25),
                    ]
                    shots = [Stage("screenshots +alpha", by_label["screenshot PNG+alpha"], 8)]
                    memory_rows, notes = await thread_memory(
                        app, counted, proxy, platform, model, [photos, shots], args.follow_ups
                    )
            finally:
                await proxy.stop()
    finally:
        await model.stop()
    report(args, turn_rows, prepare_rows, memory_rows, notes)


# the tables' columns, "|"-separated
TURN_COLUMNS = (
    "image|n|upload KiB|to model KiB|event→request ms|+ms|first visible ms|+ms|vs none|done ms|"
    "CPU ms|vs none"
)
PREPARE_COLUMNS = (
    "image|pixels|upload KiB|sent as|base64 KiB|vs upload|in Redis KiB|CPU ms|wall ms|"
    "loop lag ms|decode|orient+scale|encode|base64"
)
MEMORY_COLUMNS = (
    "thread|sent|kept|named|image key KiB|values KiB|history key KiB|entries|image turn→redis KiB|"
    "follow-up KiB from redis|to redis|round trips|images to model|to model KiB|"
    "first visible ms|+ms|CPU ms|vs none"
)


def report(
    args: argparse.Namespace,
    turn_rows: list[list[object]],
    prepare_rows: list[list[object]],
    memory_rows: list[list[object]],
    notes: list[str],
) -> None:
    print_table(
        f"1. One image in a turn (a new thread each time; medians of {args.turns} turns per row)",
        TURN_COLUMNS.split("|"),
        turn_rows,
    )
    print_table(
        f"2. Preparing one image: image_for_model in a worker thread (CPU, wall, the loop's "
        f"largest lag meanwhile), then its steps one by one (CPU ms); medians of {args.repeat}",
        PREPARE_COLUMNS.split("|"),
        prepare_rows,
    )
    print_table(
        f"3. Redis per thread holding images, and a text follow-up in that thread (medians of "
        f"{args.follow_ups}; Redis bytes and round trips: one more, through the counting proxy)",
        MEMORY_COLUMNS.split("|"),
        memory_rows,
    )
    for note in dict.fromkeys([notes[0], notes[-1]]):  # the others are alike
        print(f"round trips of a follow-up, {note}")
    print(
        "\nkept: images in the thread's hash; named: how many of them a stored history entry "
        "still names (only those can reach the model).\nimage key KiB, history key KiB: "
        "MEMORY USAGE … SAMPLES 0; values KiB: the hash's values (JSON around the base64).\n"
        "image turn→redis KiB: what the last turn that brought an image sent to Redis."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="What images cost a turn and Redis (module doc).")
    parser.add_argument("--quick", action="store_true", help="5 turns, 3 follow-ups, 2 repeats")
    parser.add_argument("--turns", type=int, default=20, help="turns per image kind")
    parser.add_argument("--follow-ups", type=int, default=10, help="timed follow-ups per stage")
    parser.add_argument("--repeat", type=int, default=5, help="image_for_model calls per kind")
    parser.add_argument("--stages", default="1,4,8,12", help="photos a thread has been sent")
    parser.add_argument("--ttft", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--tps", type=float, default=50.0)
    parser.add_argument("--latency", type=float, default=0.05, help="platform round trip, s")
    parser.add_argument("--model-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_server:
        asyncio.run(serve_model(args))
        return
    if args.quick:
        args.turns, args.follow_ups, args.repeat = 5, 3, 2
        args.stages = "1,4,8"
    args.stages = [int(n) for n in args.stages.split(",")]
    run_like_parley(measure(args))  # on the loop `parley run` uses


if __name__ == "__main__":
    main()
