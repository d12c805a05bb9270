"""Prompt schedules for `cf generate --prompt-schedule`: which prompt conditions which part of one video.

Two spellings of the same thing, a list of (prompt, duration) segments played one after the other:

- a JSONL file, one segment a line: ``{"prompt": "a red circle", "seconds": 10}`` (blank lines are skipped); a line
  may add ``"ground_truth": "clip.json"`` (relative to the file), the ground truth of a clip the prompt describes,
  which `cf generate` passes to the video's ``.segments.json`` for per-segment prompt fidelity (`cf evaluate`);
- an inline string: ``"a red circle[10s] | a blue square[20s]"`` (the ``s`` is optional: ``[10]``).

The video lasts the sum of the durations. A segment starting at time t conditions every chunk from the first chunk
boundary at or after t (`PromptSchedule.start_frames`); a segment too short to own a chunk is an error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PromptSegment", "PromptSchedule", "parse_prompt_schedule", "latent_frames_for"]

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*s?$")
_INLINE_SEGMENT = re.compile(r"^(?P<prompt>.*?)\s*\[(?P<duration>[^\[\]]*)\]$", re.DOTALL)
_EXAMPLE_LINE = '{"prompt": "a red circle", "seconds": 10}'


def latent_frames_for(seconds: float, fps: int, frames_per_chunk: int) -> int:
    """Latent frames covering `seconds` of video (1 + 4(n−1) pixel frames), rounded up to whole chunks."""
    pixel = max(1, round(seconds * fps))
    latent = (pixel - 1 + 3) // 4 + 1
    return math.ceil(latent / frames_per_chunk) * frames_per_chunk


def _short(text: str, limit: int = 40) -> str:
    """A prompt quoted on one line, cut to `limit` characters."""
    flat = " ".join(text.split())
    return json.dumps(flat if len(flat) <= limit else flat[: limit - 1] + "…", ensure_ascii=False)


@dataclass(frozen=True)
class PromptSegment:
    """One prompt held for `seconds` seconds; `ground_truth`: optional path of a clip's ground-truth json."""

    prompt: str
    seconds: float
    ground_truth: str | None = None


@dataclass(frozen=True)
class PromptSchedule:
    """Segments played in order; the video lasts `seconds` (their sum)."""

    segments: tuple[PromptSegment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError('a prompt schedule needs at least one segment, e.g. "a red circle[10s]"')
        for i, seg in enumerate(self.segments, 1):
            if not seg.prompt.strip():
                raise ValueError(f"prompt schedule segment {i} has an empty prompt; write some text before its "
                                 "duration")
            if not (isinstance(seg.seconds, (int, float)) and math.isfinite(seg.seconds) and seg.seconds > 0):
                raise ValueError(f"prompt schedule segment {i} ({_short(seg.prompt)}) lasts {seg.seconds!r} s; give "
                                 "a positive number of seconds")

    @classmethod
    def single(cls, prompt: str, seconds: float) -> "PromptSchedule":
        return cls((PromptSegment(prompt, float(seconds)),))

    @property
    def prompts(self) -> list[str]:
        return [seg.prompt for seg in self.segments]

    @property
    def seconds(self) -> float:
        return float(sum(seg.seconds for seg in self.segments))

    def num_frames(self, fps: int, frames_per_chunk: int) -> int:
        """Latent frames of the whole video (whole chunks)."""
        return latent_frames_for(self.seconds, fps, frames_per_chunk)

    def start_frames(self, fps: int, frames_per_chunk: int) -> list[int]:
        """The latent frame each segment starts at: 0, then the first chunk boundary at or after the segment's
        start time. ValueError (naming the segment and the fix) when a segment would own no chunk."""
        total = self.num_frames(fps, frames_per_chunk)
        starts, elapsed = [0], 0.0
        for seg in self.segments[:-1]:
            elapsed += seg.seconds
            starts.append(latent_frames_for(elapsed, fps, frames_per_chunk))
        chunk_seconds = 4 * frames_per_chunk / fps
        for i in range(len(starts)):
            end = starts[i + 1] if i + 1 < len(starts) else total
            if end <= starts[i]:
                seg = self.segments[i]
                raise ValueError(f"prompt schedule segment {i + 1} ({_short(seg.prompt)}, {seg.seconds:g} s) is "
                                 f"shorter than one chunk ({chunk_seconds:g} s) at its place in the video; lengthen "
                                 "it or merge it with a neighbour")
        return starts

    def describe(self) -> str:
        """The inline spelling, e.g. ``a red circle[10s] | a blue square[20s]``."""
        return " | ".join(f"{' '.join(seg.prompt.split())}[{seg.seconds:g}s]" for seg in self.segments)


def _seconds_of(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f'{where}: "seconds" must be a positive number, got {json.dumps(value)}; e.g. '
                         f"{_EXAMPLE_LINE}")
    return float(value)


def _parse_jsonl(path: Path) -> PromptSchedule:
    segments = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompt schedule {path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where} is not JSON ({getattr(err, 'msg', err)}); write one object per line, e.g. "
                             f"{_EXAMPLE_LINE}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not a JSON object; write one object per line, e.g. {_EXAMPLE_LINE}")
        unknown = sorted(set(entry) - {"prompt", "seconds", "ground_truth"})
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; only \"prompt\", "
                             f"\"seconds\" and \"ground_truth\" are read, e.g. {_EXAMPLE_LINE}")
        prompt = entry.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{where}: "prompt" must be a non-empty string; e.g. {_EXAMPLE_LINE}')
        if "seconds" not in entry:
            raise ValueError(f'{where} has no "seconds"; give every segment its duration, e.g. {_EXAMPLE_LINE}')
        truth = entry.get("ground_truth")
        if truth is not None:
            if not isinstance(truth, str) or not (path.parent / truth).is_file():
                raise ValueError(f'{where}: "ground_truth" must name an existing json file (relative to '
                                 f"{path.parent}), got {json.dumps(truth)}")
            truth = str((path.parent / truth).resolve())
        segments.append(PromptSegment(prompt, _seconds_of(entry["seconds"], where), truth))
    if not segments:
        raise ValueError(f"prompt schedule {path} holds no segments; write one JSON object per line, e.g. "
                         f"{_EXAMPLE_LINE}")
    return PromptSchedule(tuple(segments))


def _parse_inline(text: str) -> PromptSchedule:
    parts = text.split("|")
    segments = []
    for number, part in enumerate(parts, 1):
        part = part.strip()
        where = f"prompt schedule segment {number}"
        if not part:
            raise ValueError(f"{where} is empty; write segments as \"prompt one[10s] | prompt two[20s]\" with no "
                             "extra '|'")
        found = _INLINE_SEGMENT.match(part)
        if found is None:
            raise ValueError(f"{where} ({_short(part)}) has no duration; end it with one in brackets, e.g. "
                             f"{_short(part)[1:-1]}[10s]")
        prompt, duration = found.group("prompt").strip(), found.group("duration").strip()
        if not prompt:
            raise ValueError(f"{where} ([{duration}]) has no prompt; write the text before the duration, e.g. "
                             "a red circle[10s]")
        value = _DURATION.match(duration)
        if value is None or float(value.group(1)) <= 0:
            raise ValueError(f"{where} ({_short(prompt)}) has duration [{duration}]; write a positive number of "
                             "seconds, e.g. [10s] or [2.5]")
        segments.append(PromptSegment(prompt, float(value.group(1))))
    return PromptSchedule(tuple(segments))


def parse_prompt_schedule(value: str) -> PromptSchedule:
    """A schedule from a JSONL file path or an inline ``"prompt one[10s] | prompt two[20s]"`` string.

    ValueError / FileNotFoundError with a one-line message naming the fix on any malformed input."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError('--prompt-schedule is empty; pass a JSONL file or "prompt one[10s] | prompt two[20s]"')
    candidate = Path(value.strip()).expanduser()
    if "\n" not in value and "[" not in value and candidate.suffix in (".jsonl", ".json", ".txt"):
        if not candidate.is_file():
            raise FileNotFoundError(f"prompt schedule file {candidate} not found; pass an existing JSONL file "
                                    f"(one {_EXAMPLE_LINE} a line) or an inline \"prompt one[10s] | prompt two[20s]\"")
    if "\n" not in value and candidate.is_file():
        return _parse_jsonl(candidate)
    return _parse_inline(value)
