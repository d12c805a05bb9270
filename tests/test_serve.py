"""`cf serve`: the live generation equals `stream` with the same prompt switches, its slot table is the memory's
bookkeeping, and the HTTP API streams chunks, reports where a switch took effect and refuses bad requests."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from cf.cli import build_tool_parser, main
from cf.encoders import build_autoencoder, build_text_encoder
from cf.generate import GeneratorSpec, load_generator
from cf.memory import MemoryConfig, simulate_slots
from cf.rollout import SamplingConfig, make_memory, stream
from cf.serve import LiveGeneration, LiveServer, Settings, close_server, make_server
from cf.video_io import to_uint8_frames


@pytest.fixture(scope="module")
def toy():
    """(spec, model, text encoder, autoencoder): the tiny toy generator with random weights."""
    spec = GeneratorSpec()
    torch.manual_seed(0)
    model = load_generator(spec, None)
    return (spec, model, build_text_encoder(spec.text_encoder, **spec.text_encoder_kwargs),
            build_autoencoder(spec.autoencoder, **spec.autoencoder_kwargs))


def live_run(toy, memory, recache: str, switch_before: int | None, chunks: int = 6, seed: int = 3):
    spec, model, text_encoder, autoencoder = toy
    live = LiveGeneration(model, text_encoder, autoencoder, "a red circle", tuple(spec.latent_size), memory,
                          SamplingConfig(**spec.sampling), seed, recache)
    out, answers = [], []
    for index in range(chunks):
        if index == switch_before:
            answers.append(live.request_prompt("a blue square"))
        out.append(live.step())
    return live, out, answers


@pytest.mark.parametrize("preset,recache", [("slow_fast", "none"), ("slow_fast", "all"), ("sliding", "fast")])
def test_live_generation_equals_stream_with_the_switch_as_its_schedule(toy, preset, recache):
    spec, model, text_encoder, autoencoder = toy
    memory = MemoryConfig.preset(preset, frames_per_chunk=spec.frames_per_chunk)
    live, chunks, answers = live_run(toy, memory, recache, switch_before=3)
    assert answers == [3] and live.switches == [(3, "a blue square")]
    assert [c.switched for c in chunks] == [False, False, False, True, False, False]
    assert [c.prompt for c in chunks] == ["a red circle"] * 3 + ["a blue square"] * 3

    cache = make_memory(model, memory)
    reference = list(stream(model, text_encoder(["a red circle"]), 18, tuple(spec.latent_size), memory=cache,
                            sampling=SamplingConfig(**spec.sampling), seed=3,
                            text_schedule=[(9, text_encoder(["a blue square"]))], recache=recache))
    decoder = autoencoder.stream_decoder()
    for chunk, latents in zip(chunks, reference):
        assert torch.equal(chunk.latents, latents)
        assert (chunk.pixels == to_uint8_frames(decoder(latents)[0])).all()
    assert [s["frame"] for s in chunks[-1].slots] == cache.consensus_slot_frames()

    _, unswitched, _ = live_run(toy, memory, recache, switch_before=None)
    for before in range(3):
        assert torch.equal(chunks[before].latents, unswitched[before].latents)
    assert not torch.equal(chunks[3].latents, unswitched[3].latents), "the switch changed nothing"


def test_asking_for_the_current_prompt_is_no_switch(toy):
    spec, model, text_encoder, autoencoder = toy
    live = LiveGeneration(model, text_encoder, autoencoder, "a red circle", tuple(spec.latent_size), "slow_fast")
    live.step()
    assert live.request_prompt("a red circle") == 1
    assert not live.step().switched and live.switches == []
    with pytest.raises(ValueError, match="empty"):
        live.request_prompt("  ")


def test_slot_table_is_the_bookkeeping_with_its_regions(toy):
    spec = toy[0]
    config = MemoryConfig(keyframes="always", frames_per_chunk=spec.frames_per_chunk)  # 3 | 12 | 6
    _, chunks, _ = live_run(toy, config, "none", switch_before=None, chunks=10)
    expected = simulate_slots(config, 30, keyframe=lambda chunk: True)
    for k, chunk in enumerate(chunks):
        used = min(21, 3 * (k + 1))  # slots in use after chunk k
        sink, fast = min(3, used), min(6, used - min(3, used))
        regions = ["sink"] * sink + ["slow"] * (used - sink - fast) + ["fast"] * fast + ["empty"] * (21 - used)
        assert [s["frame"] for s in chunk.slots] == expected[k]
        assert [s["region"] for s in chunk.slots] == regions
        assert chunk.layers_agree


# ------------------------------------------------------------------------------------------------------------ HTTP
@pytest.fixture
def server(toy):
    spec, model, text_encoder, autoencoder = toy
    live = LiveServer(spec, model, text_encoder, autoencoder, Settings("a red circle"), max_seconds=20,
                      image_format="png")
    httpd = make_server(live, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", live
    close_server(httpd)
    thread.join(timeout=10)


def request(url: str, body: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def read_events(url: str, until_kind: str = "done") -> list[tuple[str, dict]]:
    """The server-sent events of one connection up to the first `until_kind` event."""
    events, kind = [], None
    with urllib.request.urlopen(url + "/api/events", timeout=60) as stream_:
        for line in stream_:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
                if kind == until_kind:
                    return events
    return events


def test_http_streams_chunks_and_reports_where_a_switch_took_effect(server):
    url, live = server
    status, started = request(url + "/api/start", {"prompt": "a red circle", "memory": "sliding", "seconds": 3,
                                                   "speed": 1, "seed": 1})  # paced: the switch lands mid-video
    assert status == 200 and started == {"session": 1}
    status, answer = request(url + "/api/prompt", {"prompt": "a blue square"})
    assert status == 200
    events = read_events(url)
    kinds = [kind for kind, _ in events]
    chunks = [data for kind, data in events if kind == "chunk"]
    assert kinds[0] == "start" and kinds[-1] == "done" and events[-1][1]["status"] == "finished"
    assert events[0][1]["chunks"] == len(chunks) == 5  # 3 s at 16 fps: 45 latent frames
    assert [c["index"] for c in chunks] == list(range(5))
    assert [len(c["frames"]) for c in chunks] == [9, 12, 12, 12, 12]
    assert all(f.startswith("data:image/png;base64,") for c in chunks for f in c["frames"])
    switched = [c["index"] for c in chunks if c["switched"]]
    assert switched == [answer["chunk"]]
    assert [c["prompt"] for c in chunks] == ["a red circle"] * answer["chunk"] + ["a blue square"] * (
        5 - answer["chunk"])
    assert chunks[-1]["slots"] != chunks[0]["slots"]
    status, state = request(url + "/api/state")
    assert state["status"] == "finished" and state["switches"] == [{"chunk": answer["chunk"], "prompt": "a blue "
                                                                                                      "square"}]
    assert [s["frame"] for s in state["slots"]] == [s["frame"] for s in chunks[-1]["slots"]]


def test_http_refuses_bad_requests_with_the_fix(server):
    url, _ = server
    assert request(url + "/api/prompt", {"prompt": "x"}) == (409, {"error": "no video is running; start one first"})
    status, body = request(url + "/api/start", {"prompt": "x", "memory": "bogus"})
    assert status == 400 and "unknown memory preset 'bogus'" in body["error"] and "slow_fast" in body["error"]
    status, body = request(url + "/api/start", {"prompt": "x", "seconds": 60})
    assert status == 400 and "--max-seconds" in body["error"]
    status, body = request(url + "/api/start", {"prompt": "x", "recache": "middle"})
    assert status == 400 and "unknown memory region" in body["error"]
    status, body = request(url + "/api/start", {"prompt": "x", "colour": "red"})
    assert status == 400 and "unknown setting(s) ['colour']" in body["error"]
    status, body = request(url + "/api/start", raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = request(url + "/nowhere")
    assert status == 404


def test_cf_serve_is_a_cf_command_and_checks_its_defaults():
    args = build_tool_parser({"serve": "cf.serve"}).parse_args(["serve", "--port", "0", "--memory", "sliding"])
    assert args.func.__module__ == "cf.serve" and args.memory == "sliding"
    with pytest.raises(SystemExit, match=r"cf serve: seconds must be in \(0, 600\]"):
        main(["serve", "--seconds", "0"])
