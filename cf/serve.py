"""`cf serve`: a live demo in the browser. Frames stream to the page as chunks finish, the Slow-Fast Memory's slot
table (which source frame each slot holds, per region sink | slow | fast) updates with every chunk, and the prompt
can be changed while the video runs: the change takes effect at the next chunk generated.

The server is Python's own `http.server` (one thread per request) with a single page (`cf.serve_page`); frames
travel as PNG or JPEG data URLs in server-sent events. One video is generated at a time; starting another stops
the first. Generation is paced to the video's playback speed (``--speed``; 0: as fast as possible), staying two
chunks ahead of real time, so a prompt switch shows about two chunks after it is asked for.

API (JSON): ``GET /api/state``; ``POST /api/start`` {prompt, memory, recache, seed, seconds, speed};
``POST /api/prompt`` {prompt} (answers the chunk it takes effect at); ``POST /api/stop``; ``GET /api/events``
(server-sent events ``start``, ``chunk``, ``done``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import math
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cf.encoders import build_autoencoder, build_text_encoder
from cf.export import GeneratorSpec
from cf.generate import generation_dtypes, load_generator, resolve_spec
from cf.memory import MemoryConfig, SlowFastMemory
from cf.models.wan import CausalWanDiT
from cf.prompt_schedule import latent_frames_for
from cf.recache import held_frames, parse_regions, region_slots
from cf.rollout import SamplingConfig, make_memory, stream
from cf.serve_page import PAGE
from cf.video_io import to_uint8_frames
from cf.weights import NonFiniteWeightsError

# "generator": the memory the generator was trained with (its config.json)
MEMORY_CHOICES = ("generator", "slow_fast", "sliding", "self_forcing", "full", "released_code",
                  "uniform_every_chunk", "uniform_every_2_chunks", "no_bounded_pe")
RECACHE_CHOICES = ("none", "fast", "slow+fast", "all")
CHUNKS_AHEAD = 2  # paced generation stays this many chunks ahead of playback


def slot_table(memory: SlowFastMemory) -> tuple[list[dict[str, Any]], bool]:
    """([{"frame", "region"} per slot], whether every layer holds the same frames).

    The frames are the memory's consensus table (`SlowFastMemory.consensus_slot_frames`, sample 0; −1: empty); the
    region of a slot in use is sink | slow | fast (`cf.recache.region_slots`), "empty" otherwise."""
    frames = memory.consensus_slot_frames()
    region_of = {slot: name for name, slots in region_slots(memory).items() for slot in slots}
    agree = memory.layers is None or all(memory.slot_frames(layer) == frames for layer in range(memory.num_layers))
    return [{"frame": int(f), "region": region_of.get(s, "empty")} for s, f in enumerate(frames)], agree


@dataclass
class LiveChunk:
    """One finished chunk of a `LiveGeneration`: latents [1, C, n, h, w], pixels uint8 [t, H, W, 3]."""

    index: int
    start_frame: int
    prompt: str
    switched: bool
    latents: torch.Tensor
    pixels: np.ndarray
    slots: list[dict[str, Any]]
    layers_agree: bool


class LiveGeneration:
    """One video generated chunk by chunk (one sample), whose prompt can change between chunks.

    It drives one endless `cf.rollout.stream` (fresh noise, few-step denoising, commit pass per chunk), whose
    schedule is asked at every chunk for a prompt requested meanwhile: a prompt given to `request_prompt` (from any
    thread) conditions every chunk from the next one generated, its text K/V computed once and the memory's
    `recache` regions re-cached under it (`cf.recache`), so a video equals `stream` with the same switches as its
    `text_schedule`. Each `step` decodes the chunk and reads the memory's slot table."""

    def __init__(self, model: CausalWanDiT, text_encoder: torch.nn.Module, autoencoder: Any, prompt: str,
                 latent_size: tuple[int, int], memory: MemoryConfig | str = "slow_fast",
                 sampling: SamplingConfig | None = None, seed: int = 0, recache: str = "none") -> None:
        self.model, self.text_encoder = model, text_encoder
        self.device = next(model.parameters()).device
        regions = parse_regions(recache)
        self.memory = make_memory(model, memory)
        if regions and held_frames(self.memory) is None:
            raise ValueError(f"re-caching needs the Slow-Fast Memory, not {type(self.memory).__name__}")
        self.decoder = autoencoder.stream_decoder()
        self.prompt = prompt
        self.chunks_done = 0
        self.switches: list[tuple[int, str]] = []  # (chunk index, prompt) of every switch that took effect
        self._pending: str | None = None
        self._switched = False
        self._busy = False
        self._lock = threading.Lock()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self._chunks = stream(model, self._embed(prompt), None, latent_size, memory=self.memory, sampling=sampling,
                              generator=generator, text_schedule=self._switch_at, recache=recache)

    def _embed(self, prompt: str) -> torch.Tensor:
        return self.text_encoder([prompt]).to(self.device)

    def _switch_at(self, start_frame: int) -> torch.Tensor | None:
        """`stream`'s schedule: the embeddings of a prompt requested since the last chunk, else None."""
        with self._lock:
            pending, self._pending, self._busy = self._pending, None, True
        self._switched = pending is not None and pending != self.prompt
        if not self._switched:
            return None
        self.prompt = pending
        self.switches.append((start_frame // self.model.frames_per_chunk, pending))
        return self._embed(pending)

    def request_prompt(self, prompt: str) -> int:
        """Condition the chunks from the next one generated on `prompt`; returns that chunk's index."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the new prompt is empty; type some text")
        with self._lock:
            self._pending = prompt
            return self.chunks_done + int(self._busy)

    @torch.no_grad()
    def step(self) -> LiveChunk:
        """Generate, commit and decode the next chunk."""
        index = self.chunks_done
        x0 = next(self._chunks)
        pixels = to_uint8_frames(self.decoder(x0.float())[0])
        slots, agree = slot_table(self.memory)
        with self._lock:
            self.chunks_done, self._busy = index + 1, False
        return LiveChunk(index, index * self.model.frames_per_chunk, self.prompt, self._switched, x0, pixels, slots,
                         agree)


def encode_frame(frame: np.ndarray, image_format: str = "jpeg") -> str:
    """A data URL of one uint8 [H, W, 3] frame (png: exact; jpeg: quality 90)."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(frame).save(buffer, format="PNG")
    else:
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
    return f"data:image/{image_format};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class EventLog:
    """Server-sent events for every page: the current video's ``start`` event and the latest `keep` events."""

    def __init__(self, keep: int = 256) -> None:
        self.events: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=keep)
        self.start: tuple[int, str, str] | None = None
        self.last_id = 0
        self.closed = False
        self.changed = threading.Condition()

    def publish(self, kind: str, data: dict[str, Any]) -> int:
        with self.changed:
            self.last_id += 1
            event = (self.last_id, kind, json.dumps(data))
            self.events.append(event)
            if kind == "start":
                self.start = event
            self.changed.notify_all()
            return self.last_id

    def after(self, last_id: int | None, timeout: float) -> list[tuple[int, str, str]]:
        """Events after `last_id` (None: the current video's from its start), waiting up to `timeout` s for one."""
        with self.changed:
            if last_id is None:
                if self.start is None:
                    return []
                return [self.start] + [e for e in self.events if e[0] > self.start[0]]
            self.changed.wait_for(lambda: self.closed or self.last_id > last_id, timeout)
            return [e for e in self.events if e[0] > last_id]

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


@dataclass
class Settings:
    """What the page chooses before starting a video."""

    prompt: str
    memory: str = "generator"
    recache: str = "none"
    seed: int = 0
    seconds: float = 30.0
    speed: float = 1.0  # playback seconds per wall-clock second (0: no pacing)

    @classmethod
    def from_request(cls, raw: dict[str, Any], max_seconds: float, defaults: "Settings") -> "Settings":
        """Validated settings from a request body (missing fields: `defaults`); ValueError naming the fix."""
        if not isinstance(raw, dict):
            raise ValueError("the request body must be a JSON object")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        merged = {**asdict(defaults), **raw}
        prompt, memory = merged["prompt"], merged["memory"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; type some text")
        if memory not in MEMORY_CHOICES:
            raise ValueError(f"unknown memory preset {memory!r}; choose one of {', '.join(MEMORY_CHOICES)}")
        parse_regions(merged["recache"])
        number = (int, float)
        seconds, speed, seed = merged["seconds"], merged["speed"], merged["seed"]
        if isinstance(seconds, bool) or not isinstance(seconds, number) or not 0 < seconds <= max_seconds:
            raise ValueError(f"seconds must be in (0, {max_seconds:g}] (the server's --max-seconds), got {seconds!r}")
        if isinstance(speed, bool) or not isinstance(speed, number) or not (math.isfinite(speed) and speed >= 0):
            raise ValueError(f"speed must be a number >= 0 (0: as fast as possible), got {speed!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return cls(prompt, memory, merged["recache"], seed, float(seconds), float(speed))


class LiveServer:
    """The generator, its encoders, the video in progress and the events the pages read."""

    def __init__(self, spec: GeneratorSpec, model: CausalWanDiT, text_encoder: torch.nn.Module, autoencoder: Any,
                 defaults: Settings, max_seconds: float = 600.0, image_format: str = "jpeg",
                 description: str = "") -> None:
        self.spec, self.model = spec, model
        self.text_encoder, self.autoencoder = text_encoder, autoencoder
        self.defaults, self.max_seconds, self.image_format = defaults, max_seconds, image_format
        self.description = description
        self.events = EventLog()
        self.session = 0
        self.live: LiveGeneration | None = None
        self.settings: Settings | None = None
        self.status = "idle"  # idle | running | finished | stopped | error
        self.last_slots: list[dict[str, Any]] = []  # the slot table after the latest chunk
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def memory_config(self, name: str) -> MemoryConfig:
        return self.spec.memory_config(None if name == "generator" else name)

    def start(self, settings: Settings) -> int:
        """Stop the video in progress and start a new one; returns its session number."""
        spec = self.spec
        with self._lock:
            self.stop()
            live = LiveGeneration(self.model, self.text_encoder, self.autoencoder, settings.prompt,
                                  tuple(spec.latent_size), self.memory_config(settings.memory),
                                  SamplingConfig(**spec.sampling), settings.seed, settings.recache)
            self.session += 1
            self.settings, self.status, self.live, self.last_slots = settings, "running", live, []
            self._stop = threading.Event()
            chunks = latent_frames_for(settings.seconds, spec.fps, spec.frames_per_chunk) // spec.frames_per_chunk
            self.events.publish("start", {"session": self.session, "settings": asdict(settings), "chunks": chunks,
                                          **self.info()})
            self._thread = threading.Thread(target=self._run, args=(self.session, live, settings, chunks, self._stop),
                                            name=f"cf-serve-{self.session}", daemon=True)
            self._thread.start()
            return self.session

    def stop(self) -> None:
        """Stop the video in progress after its current chunk (waits for it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def request_prompt(self, prompt: str) -> int:
        """Switch the running video's prompt; returns the chunk it takes effect at. LookupError when none runs."""
        live = self.live
        if self.status != "running" or live is None:
            raise LookupError("no video is running; start one first")
        return live.request_prompt(prompt)

    def info(self) -> dict[str, Any]:
        spec = self.spec
        factor = int(spec.autoencoder_kwargs.get("spatial_factor", 8))
        return {"fps": spec.fps, "frames_per_chunk": spec.frames_per_chunk, "description": self.description,
                "frame_size": [spec.latent_size[0] * factor, spec.latent_size[1] * factor]}

    def state(self) -> dict[str, Any]:
        live = self.live
        return {"status": self.status, "session": self.session,
                "settings": asdict(self.settings) if self.settings else None,
                "defaults": asdict(self.defaults), "memory_choices": list(MEMORY_CHOICES),
                "recache_choices": list(RECACHE_CHOICES), "max_seconds": self.max_seconds,
                "chunks_done": live.chunks_done if live else 0, "prompt": live.prompt if live else None,
                "switches": [{"chunk": c, "prompt": p} for c, p in (live.switches if live else [])],
                "slots": self.last_slots, **self.info()}

    def _run(self, session: int, live: LiveGeneration, settings: Settings, chunks: int, stop: threading.Event
             ) -> None:
        spec = self.spec
        message = ""
        try:
            began, shown = time.perf_counter(), 0
            chunk_seconds = 4 * spec.frames_per_chunk / spec.fps
            for _ in range(chunks):
                if settings.speed > 0:  # keep CHUNKS_AHEAD chunks ahead of playback
                    due = began + (shown / spec.fps - CHUNKS_AHEAD * chunk_seconds) / settings.speed
                    stop.wait(max(0.0, due - time.perf_counter()))
                if stop.is_set():
                    break
                chunk = live.step()
                shown += len(chunk.pixels)
                self.last_slots = chunk.slots
                self.events.publish("chunk", {
                    "session": session, "index": chunk.index, "start_frame": chunk.start_frame,
                    "prompt": chunk.prompt, "switched": chunk.switched, "slots": chunk.slots,
                    "layers_agree": chunk.layers_agree, "seconds": shown / spec.fps,
                    "frames": [encode_frame(f, self.image_format) for f in chunk.pixels]})
            self.status = "stopped" if stop.is_set() else "finished"
        except Exception as error:  # noqa: BLE001 (reported to the page; the server keeps running)
            traceback.print_exc()
            self.status, message = "error", f"{type(error).__name__}: {error}"
        self.events.publish("done", {"session": session, "status": self.status, "chunks": live.chunks_done,
                                     "message": message})


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        live = self.server.live
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/state":
            self._json(HTTPStatus.OK, live.state())
        elif path == "/api/events":
            self._events()
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}; open /"})

    def do_POST(self) -> None:  # noqa: N802
        live = self.server.live
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not JSON ({error})"})
            return
        try:
            if self.path == "/api/start":
                settings = Settings.from_request(body, live.max_seconds, live.defaults)
                self._json(HTTPStatus.OK, {"session": live.start(settings)})
            elif self.path == "/api/prompt":
                prompt = body.get("prompt") if isinstance(body, dict) else None
                self._json(HTTPStatus.OK, {"chunk": live.request_prompt(prompt), "prompt": prompt})
            elif self.path == "/api/stop":
                live.stop()
                self._json(HTTPStatus.OK, {"status": live.status})
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such action {self.path}"})
        except LookupError as error:
            self._json(HTTPStatus.CONFLICT, {"error": str(error)})
        except ValueError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Exception as error:  # noqa: BLE001 (the page shows it; the server keeps running)
            traceback.print_exc()
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(error).__name__}: {error}"})

    def _events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        log = self.server.live.events
        header = self.headers.get("Last-Event-ID")
        last = int(header) if header and header.isdigit() else None
        try:
            while not log.closed:
                events = log.after(last, timeout=10.0)
                if not events and last is None:
                    last = log.last_id
                out = "".join(f"id: {i}\nevent: {kind}\ndata: {data}\n\n" for i, kind, data in events) or ": idle\n\n"
                self.wfile.write(out.encode())
                self.wfile.flush()
                if events:
                    last = events[-1][0]
        except (BrokenPipeError, ConnectionResetError):
            pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    live: LiveServer
    verbose: bool = False


def make_server(live: LiveServer, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False) -> _HTTPServer:
    """An HTTP server for `live` bound to (host, port) (port 0: a free one); run it with `serve_forever()` and end
    it with `close_server`."""
    server = _HTTPServer((host, port), _Handler)
    server.live, server.verbose = live, verbose
    return server


def close_server(server: _HTTPServer) -> None:
    """Stop the video in progress, end the event streams and the server (call from another thread than the one
    in `serve_forever`)."""
    server.live.stop()
    server.live.events.close()
    server.shutdown()
    server.server_close()


def run(args: argparse.Namespace) -> None:
    weights = Path(args.weights) if args.weights else None
    try:
        spec = resolve_spec(weights, args.config)
        defaults = Settings.from_request({"prompt": args.prompt, "memory": args.memory, "recache": args.recache,
                                          "seed": args.seed, "seconds": args.seconds, "speed": args.speed},
                                         args.max_seconds, Settings(args.prompt))
        spec.memory_config(None if args.memory == "generator" else args.memory)
        dtype, encoder_dtype = generation_dtypes(args.device, args.dtype, args.encoder_dtype, spec)
        model = load_generator(spec, weights, args.device, dtype, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError, NonFiniteWeightsError) as err:
        raise SystemExit(f"cf serve: {err}") from None
    autoencoder = build_autoencoder(spec.autoencoder, dtype=encoder_dtype, **spec.autoencoder_kwargs).to(args.device)
    text_encoder = build_text_encoder(spec.text_encoder, dtype=encoder_dtype,
                                      **spec.text_encoder_kwargs).to(args.device)
    description = f"{weights or 'random toy weights'} on {args.device}"
    live = LiveServer(spec, model, text_encoder, autoencoder, defaults, args.max_seconds, args.image_format,
                      description)
    try:
        server = make_server(live, args.host, args.port, args.verbose)
    except OSError as err:
        raise SystemExit(f"cf serve: cannot listen on {args.host}:{args.port} ({err}); pick another --port "
                         "(0: any free one)") from None
    host, port = server.server_address[:2]
    print(f"cf serve: {description}; open http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("cf serve: stopped", file=sys.stderr)
    finally:
        live.stop()
        live.events.close()
        server.server_close()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="a live demo in the browser: frames as chunks finish, the memory's slot "
                              "table, prompt switches mid-stream", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="student weights (as for cf generate); omit for random toy weights")
    p.add_argument("--no-ema", action="store_true", help="with a checkpoint: use the training weights, not the EMA")
    p.add_argument("--config", help="generator config.json (default: the one next to --weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    p.add_argument("--prompt", default="a red circle on a green striped background", help="the page's first prompt")
    p.add_argument("--memory", default="generator", choices=MEMORY_CHOICES,
                   help="the page's default memory preset (generator: the generator's own memory config)")
    p.add_argument("--recache", default="none", help="the page's default regions re-cached at a prompt switch: "
                   "none, fast, slow, sink, all, or joined by + (e.g. slow+fast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=30.0, help="the page's default video length (default 30)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="the longest video a page may ask for")
    p.add_argument("--speed", type=float, default=1.0, help="playback speed the generation is paced to (default 1: "
                   "real time; 0: as fast as the device goes)")
    p.add_argument("--image-format", default="jpeg", choices=["jpeg", "png"],
                   help="how frames travel to the page (png: exact, larger)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the DiT's dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--encoder-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the VAE's and text encoder's dtype (auto: bfloat16 on CUDA, else the generator's own)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=run)
    return p
