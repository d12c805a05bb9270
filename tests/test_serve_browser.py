"""`cf serve` in a real headless Chromium on the toy model: frames arrive in the page, a prompt switch clicked in the
page takes effect at the chunk the server reports (the frames before it equal a run without the switch, the frames
from it on differ, and all of them equal `stream` with that switch as its schedule), and the slot table updates
with every chunk to the memory's table."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from cf.encoders import build_autoencoder, build_text_encoder
from cf.generate import GeneratorSpec, load_generator
from cf.rollout import SamplingConfig, make_memory, stream
from cf.serve import LiveServer, Settings, close_server, make_server
from cf.video_io import to_uint8_frames
from helpers.chromium import BINARIES, HeadlessChromium, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=f"no Chromium binary found (tried $CHROMIUM and "
                                f"{', '.join(BINARIES)}); install it, e.g. apt-get install -y chromium")

FIRST, SECOND = "a red circle on a green striped background", "a blue square on a yellow background"
SEED, SECONDS = 5, 10.0  # 10 s at 16 fps: 42 latent frames, 14 chunks of 3


def pixels_of(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def run_in_page(page: HeadlessChromium, switch_after: int | None) -> dict:
    """Start a video from the page's controls, click a prompt switch once `switch_after` chunks have arrived, and
    return what the page received and shows once the video is done."""
    settings = {"prompt": FIRST, "memory": "slow_fast", "recache": "none", "seed": SEED, "seconds": SECONDS,
                "speed": 4}
    session = page.evaluate("cfLive.session")
    page.evaluate("(() => { const s = " + json.dumps(settings) + "; for (const k in s) "
                  "document.getElementById(k).value = s[k]; document.getElementById('start').click(); })()")
    page.wait_for(f"cfLive.session !== {json.dumps(session)}", timeout=30)
    if switch_after is not None:
        page.wait_for(f"cfLive.chunks.length >= {switch_after}", timeout=60)
        page.evaluate(f"document.getElementById('next-prompt').value = {json.dumps(SECOND)}; "
                      "document.getElementById('switch').click()")
        page.wait_for("cfLive.queued !== null", timeout=30)
    page.wait_for("cfLive.done !== null", timeout=120)
    return page.evaluate("""JSON.stringify({
        chunks: cfLive.chunks.map(c => ({index: c.index, prompt: c.prompt, switched: c.switched, frames: c.frames,
                                         slots: c.slots.map(s => s.frame)})),
        queued: cfLive.queued, done: cfLive.done, shown: cfLive.framesShown, received: cfLive.framesReceived,
        table: [...document.querySelectorAll('#slots tbody tr')].map(row => ({
            label: row.cells[0].textContent,
            frames: [...row.querySelectorAll('td.slot')].map(td => td.textContent === '' ? -1 : Number(td.textContent)),
            regions: [...row.querySelectorAll('td.slot')].map(td => td.dataset.region)})),
        log: [...document.querySelectorAll('#switch-log li')].map(li => li.textContent)})""")


def test_browser_streams_frames_switches_prompts_and_updates_the_slot_table():
    spec = GeneratorSpec()
    torch.manual_seed(0)
    model = load_generator(spec, None)
    text_encoder = build_text_encoder(spec.text_encoder, **spec.text_encoder_kwargs)
    autoencoder = build_autoencoder(spec.autoencoder, **spec.autoencoder_kwargs)
    live = LiveServer(spec, model, text_encoder, autoencoder, Settings("a prompt"), max_seconds=30,
                      image_format="png")
    httpd = make_server(live, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with HeadlessChromium(CHROMIUM, f"http://127.0.0.1:{httpd.server_address[1]}/") as page:
            page.wait_for("window.cfLive && cfLive.ready", timeout=30)
            switched = json.loads(run_in_page(page, switch_after=3))
            state = live.state()
            plain = json.loads(run_in_page(page, switch_after=None))
    finally:
        close_server(httpd)
        thread.join(timeout=10)

    chunks = switched["chunks"]
    total = len(chunks)
    assert switched["done"]["status"] == "finished" and total == 14
    assert [c["index"] for c in chunks] == list(range(total))
    assert [len(c["frames"]) for c in chunks] == [9] + [12] * (total - 1)  # every frame arrived
    assert switched["received"] == 9 + 12 * (total - 1) and switched["shown"] > 0

    # the switch: where the server said it would take effect, where it reports it, and where the page shows it
    at = switched["queued"]["chunk"]
    assert 3 <= at < total, f"the switch landed at chunk {at} of {total}"
    assert state["switches"] == [{"chunk": at, "prompt": SECOND}]
    assert [c["index"] for c in chunks if c["switched"]] == [at]
    assert [c["prompt"] for c in chunks] == [FIRST] * at + [SECOND] * (total - at)
    assert switched["log"] == [f"{at}: {SECOND}"]
    assert not any(c["switched"] for c in plain["chunks"]) and plain["log"] == []
    for before, after in zip(chunks, plain["chunks"]):
        assert (before["frames"] == after["frames"]) == (before["index"] < at), before["index"]

    # every frame equals `stream` with the switch as its schedule, decoded; the memory's final table too
    cache = make_memory(model, spec.memory_config("slow_fast"))
    reference = stream(model, text_encoder([FIRST]), 3 * total, tuple(spec.latent_size), memory=cache,
                       sampling=SamplingConfig(**spec.sampling), seed=SEED,
                       text_schedule=[(3 * at, text_encoder([SECOND]))])
    decoder = autoencoder.stream_decoder()
    for chunk, latents in zip(chunks, reference):
        expected = to_uint8_frames(decoder(latents)[0])
        assert all((pixels_of(f) == e).all() for f, e in zip(chunk["frames"], expected, strict=True)), chunk["index"]
    table = switched["table"]
    assert table[0]["frames"] == chunks[-1]["slots"] == cache.consensus_slot_frames()

    # the slot table: one row per chunk, newest first, each the table the server sent after that chunk
    assert [row["label"].split()[0] for row in table] == [f"#{i}" for i in reversed(range(total))]
    assert [row["frames"] for row in table] == [c["slots"] for c in reversed(chunks)]
    assert table[-1]["frames"] != table[0]["frames"]
    assert table[-1]["regions"] == ["sink"] * 3 + ["empty"] * 18
    assert table[0]["regions"] == ["sink"] * 3 + ["slow"] * 12 + ["fast"] * 6
