"""What `cf demo` measures on its 60 s generations, and the report it writes.

Every held-out clip of the demo's dataset gives two prompts: its **named** caption (every colour named: "a red
circle and a blue square on a navy striped background") and its **unnamed** one ("two shapes on a striped
background"), whose colours the generator must choose and then keep. Each generated video is scored from its
pixels against the clip's ground truth:

- **prompted attributes** (named prompts): `cf.evaluation.prompted.prompt_fidelity`, background coverage and
  named-sprite presence, per frame and per 10 s window, reported as the ratio to the held-out clips' own level;
- **unprompted attributes kept** (unnamed prompts, the memory claim): the background colour the generator chose,
  as the drift of the background's mean colour from the first second (`cf.evaluation.ground_truth.
  reference_free_metrics`, RGB distance, sprites' colours excluded), per 10 s window; and the sprites' colours after
  re-entry (`cf.evaluation.reentry.reentry_consistency`: the fraction of a returning sprite's pixels in the colour it
  had in the first second, next to the same fraction before the first exit);
- **flashbacks** (all prompts): sudden returns towards the first frame after a decline (`cf.evaluation.flashback.
  detect_flashbacks` on the pixel similarity to the first frame, `cf.evaluation.metrics.
  pixel_similarity_to_first_frame`), per minute of video.

`summarize_models` averages per model; `write_report` writes the markdown report with tables, metric-vs-time plots
and a frame strip per model (rows: prompts; columns: frames spread over the minute); `claim_table` compares models
over several seeds of the whole pipeline (mean ± sample standard deviation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["DemoPrompt", "demo_prompts", "score_video", "summarize_models", "write_report", "claim_table",
           "WINDOW_S", "CLAIM_METRICS"]

WINDOW_S = 10.0
SETTLE_S = 5.0  # the settled-background drift compares each frame after WINDOW_S with the background at SETTLE_S
STRIP_COLUMNS = 8
# (summary key, label, larger is better)
CLAIM_METRICS = (
    ("unnamed_background_drift_late", "unprompted background colour drift after 10 s, RGB distance (unnamed prompts; "
                                      "lower is better)"),
    ("unnamed_background_drift_settled", "unprompted background colour drift after 10 s from the background at 5 s, "
                                         "RGB distance (unnamed prompts; lower is better)"),
    ("unnamed_explained_after_reentry", "unprompted colours kept after re-entry (unnamed prompts)"),
    ("unnamed_explained_before_exit", "unprompted colours kept before the first exit (unnamed prompts)"),
    ("named_background_ratio", "background coverage / held-out clips (named prompts)"),
    ("named_sprite_ratio", "named-sprite presence / held-out clips (named prompts)"),
)


@dataclass
class DemoPrompt:
    """One generation prompt: the held-out clip ``clip`` (its index), ``kind`` "named" | "unnamed", the text, the
    clip's ground truth (every attribute) and the video's file stem."""

    clip: int
    kind: str
    text: str
    gt: dict[str, Any]
    name: str


def demo_prompts(clips: Sequence[Mapping[str, Any]]) -> list[DemoPrompt]:
    """The named and the unnamed prompt of each held-out clip (``cf.toy_base.held_out_clips`` rows)."""
    from cf.evaluation.continuation import all_attributes
    from data.synthetic import caption_for

    prompts = []
    for i, clip in enumerate(clips):
        gt = all_attributes(clip["gt"])
        for kind, named in (("named", True), ("unnamed", False)):
            prompts.append(DemoPrompt(i, kind, caption_for(gt, named=named), gt, f"c{i:02d}_{kind}"))
    return prompts


def _windowed(curve: Sequence[float] | None, fps: float, seconds: float) -> list[float | None]:
    """Means of a per-frame curve over consecutive windows of ``seconds`` (a last window under half full is
    dropped: a 60 s video of 961 frames has six windows)."""
    if curve is None:
        return []
    values = np.asarray(curve, dtype=float)
    size = max(1, round(seconds * fps))
    means = []
    for start in range(0, len(values), size):
        window = values[start : start + size]
        if len(window) < size / 2:
            break
        means.append(float(np.nanmean(window)) if np.isfinite(window).any() else None)
    return means


def score_video(frames: np.ndarray, prompt: DemoPrompt, fps: float) -> dict[str, Any]:
    """Scores of one video (uint8 ``[T, H, W, 3]``) for its prompt: prompt fidelity (named prompts only; per 10 s
    window too) and re-entry consistency."""
    import torch

    from cf.evaluation.flashback import detect_flashbacks
    from cf.evaluation.ground_truth import reference_free_metrics
    from cf.evaluation.metrics import pixel_similarity_to_first_frame
    from cf.evaluation.prompted import prompt_fidelity
    from cf.evaluation.reentry import reentry_consistency

    result: dict[str, Any] = {"prompt": prompt.text, "kind": prompt.kind, "clip": prompt.clip,
                              "seconds": frames.shape[0] / fps}
    if prompt.kind == "named":
        fidelity = prompt_fidelity(frames, prompt.gt)
        result["background_coverage"] = fidelity["background_coverage"]
        result["sprite_presence"] = fidelity["sprite_presence"]
        result["background_coverage_windows"] = _windowed(fidelity["background_coverage_curve"], fps, WINDOW_S)
        result["sprite_presence_windows"] = _windowed(fidelity["sprite_presence_curve"], fps, WINDOW_S)
    drift = reference_free_metrics(frames, fps)["background_colour_drift"]["curve"]
    drift = [float("nan") if v is None else v for v in drift]
    result["background_drift_windows"] = _windowed(drift, fps, WINDOW_S)
    result["background_drift_late"] = _late_mean(drift, round(WINDOW_S * fps))
    # the same drift measured from the background the video has settled on by SETTLE_S, not from its first second
    # (a generator's first chunk, drawn from noise, may differ from what it keeps drawing after)
    start, late = round(SETTLE_S * fps), round(WINDOW_S * fps)
    settled = []
    if frames.shape[0] > late:
        settled = reference_free_metrics(frames[start:], fps)["background_colour_drift"]["curve"]
    result["background_drift_settled"] = _late_mean(settled, late - start)
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    result["flashbacks"] = len(detect_flashbacks(pixel_similarity_to_first_frame(pixels), fps))
    reentry = reentry_consistency(frames, fps)
    result["reentry"] = {k: reentry[k] for k in ("num_exits", "num_reentries", "explained_before_exit",
                                                  "explained_after_reentry", "explained_per_second",
                                                  "identity_colours")}
    return result


def _late_mean(curve: Sequence[float | None], start: int) -> float | None:
    """Mean of ``curve[start:]`` over its finite values (None where there are none)."""
    late = np.asarray([float("nan") if v is None else v for v in curve[start:]], dtype=float)
    return float(np.nanmean(late)) if np.isfinite(late).any() else None


def autoencoded(frames: np.ndarray, autoencoder: Any) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames through ``autoencoder``'s encode and decode (the first ``1 + 4k`` frames): what
    a perfect generator of that latent space would draw, the fair reference for a model's frames."""
    import torch

    usable = (frames.shape[0] - 1) // 4 * 4 + 1
    video = torch.from_numpy(np.ascontiguousarray(frames[:usable])).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        decoded = autoencoder.decode(autoencoder.encode(video))[0]
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else None


def _window_means(rows: Sequence[Mapping[str, Any]], key: str) -> list[float | None]:
    length = max((len(r.get(key, [])) for r in rows), default=0)
    return [_mean([r[key][w] for r in rows if len(r.get(key, [])) > w]) for w in range(length)]


def summarize_models(scores: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per model (``scores[model]`` = `score_video` rows; the model ``dataset`` = the held-out clips themselves,
    scored as named and unnamed prompts alike): the means the report and the claim use. Ratios divide by the
    dataset's means."""
    out: dict[str, dict[str, Any]] = {}
    for model, rows in scores.items():
        named = [r for r in rows if r["kind"] == "named"]
        unnamed = [r for r in rows if r["kind"] == "unnamed"]
        out[model] = {
            "videos": len(rows),
            "named_background": _mean([r.get("background_coverage") for r in named]),
            "named_sprite": _mean([r.get("sprite_presence") for r in named]),
            "named_background_windows": _window_means(named, "background_coverage_windows"),
            "named_sprite_windows": _window_means(named, "sprite_presence_windows"),
            "unnamed_background_drift_late": _mean([r.get("background_drift_late") for r in unnamed]),
            "unnamed_background_drift_settled": _mean([r.get("background_drift_settled") for r in unnamed]),
            "unnamed_background_drift_windows": _window_means(unnamed, "background_drift_windows"),
            "unnamed_explained_after_reentry": _mean([r["reentry"]["explained_after_reentry"] for r in unnamed]),
            "unnamed_explained_before_exit": _mean([r["reentry"]["explained_before_exit"] for r in unnamed]),
            "unnamed_reentries": int(sum(r["reentry"]["num_reentries"] for r in unnamed)),
            "unnamed_exits": int(sum(r["reentry"]["num_exits"] for r in unnamed)),
            "flashbacks_per_minute": (60.0 * sum(r.get("flashbacks", 0) for r in rows)
                                      / max(sum(r.get("seconds", 0.0) for r in rows), 1e-9)) if rows else None,
            "named_explained_after_reentry": _mean([r["reentry"]["explained_after_reentry"] for r in named]),
            "unnamed_explained_per_second": _window_means(
                [{"c": r["reentry"]["explained_per_second"]} for r in unnamed], "c"),
        }
    reference = out.get("dataset", {})
    for data in out.values():
        for key, base in (("named_background_ratio", "named_background"), ("named_sprite_ratio", "named_sprite")):
            ref = reference.get(base)
            data[key] = None if data[base] is None or not ref else data[base] / ref
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _plot_lines(path: Path, series: Mapping[str, Sequence[float | None]], step_s: float, ylabel: str,
                title: str, unit_range: bool = True) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in series.items():
        if not values:
            continue
        times = [(i + 0.5) * step_s for i in range(len(values))]
        ax.plot(times, [np.nan if v is None else v for v in values], marker="o" if step_s > 1 else None,
                label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if unit_range:
        ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float | None], width: int = 5) -> list[float | None]:
    out = []
    for i in range(len(values)):
        out.append(_mean(values[max(0, i - width // 2) : i + width // 2 + 1]))
    return out


def write_report(out: Path, summary: Mapping[str, Mapping[str, Any]], strips: Mapping[str, str],
                 teacher: Mapping[str, Any] | None, stages: Sequence[Mapping[str, Any]], elapsed_s: float,
                 settings: Mapping[str, Any], videos: Mapping[str, Path]) -> Path:
    """``out/report.md`` with the tables, plots (written to ``out/plots``) and frame strips (paths relative to
    ``out``), and ``out/summary.json``."""
    import os

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    drawn = [
        _plot_lines(plots / "background_coverage_vs_time.png",
                    {m: s["named_background_windows"] for m, s in summary.items()}, WINDOW_S,
                    "background coverage", "named prompts: the prompt's background"),
        _plot_lines(plots / "sprite_presence_vs_time.png",
                    {m: s["named_sprite_windows"] for m, s in summary.items()}, WINDOW_S,
                    "named-sprite presence", "named prompts: the prompt's sprites"),
        _plot_lines(plots / "unprompted_background_drift_vs_time.png",
                    {m: s["unnamed_background_drift_windows"] for m, s in summary.items()}, WINDOW_S,
                    "RGB distance from the first second", "unnamed prompts: background colour drift",
                    unit_range=False),
        _plot_lines(plots / "unprompted_colours_vs_time.png",
                    {m: _smooth(s["unnamed_explained_per_second"]) for m, s in summary.items() if m != "dataset"},
                    1.0, "foreground in the first second's colours", "unnamed prompts: colours kept (5 s mean)"),
    ]
    lines = ["# Context Forcing toy demo", "",
             f"Whole pipeline: {elapsed_s / 60:.1f} min on this machine ({os.cpu_count()} CPU cores); settings: "
             f"`{json.dumps(dict(settings))}`.", "",
             "Each held-out clip gives a **named** prompt (every colour in the text) and an **unnamed** one (\"two "
             "shapes on a striped background\": the generator chooses the colours, and only its memory can keep "
             "them when a sprite leaves the frame and comes back). `dataset` = the held-out clips themselves "
             "(10-30 s), scored the same way.", "",
             "## Prompted and unprompted attributes over the whole video", "",
             "| model | videos | background / dataset | named sprites / dataset | unprompted background drift "
             "after 10 s | the same from the background at 5 s | unprompted colours after re-entry | before the first "
             "exit | re-entries / exits (unnamed) | flashbacks / min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, s in summary.items():
        lines.append(f"| {model} | {s['videos']} | {_fmt(s['named_background_ratio'])} "
                     f"({_fmt(s['named_background'])}) | {_fmt(s['named_sprite_ratio'])} ({_fmt(s['named_sprite'])})"
                     f" | {_fmt(s['unnamed_background_drift_late'], 1)}"
                     f" | {_fmt(s['unnamed_background_drift_settled'], 1)}"
                     f" | {_fmt(s['unnamed_explained_after_reentry'])}"
                     f" | {_fmt(s['unnamed_explained_before_exit'])}"
                     f" | {s['unnamed_reentries']} / {s['unnamed_exits']} | {_fmt(s['flashbacks_per_minute'], 1)} |")
    for key, label in (("named_background_windows", "background coverage (named prompts)"),
                       ("named_sprite_windows", "named-sprite presence (named prompts)"),
                       ("unnamed_background_drift_windows", "background colour drift from the first second, RGB "
                                                            "distance (unnamed prompts)")):
        length = max(len(s[key]) for s in summary.values())
        lines += ["", f"**{label}, per {WINDOW_S:g} s window**", "",
                  "| model | " + " | ".join(f"{w * WINDOW_S:g}-{(w + 1) * WINDOW_S:g} s" for w in range(length)) + " |",
                  "|---|" + "---|" * length]
        for model, s in summary.items():
            values = list(s[key]) + [None] * (length - len(s[key]))
            digits = 1 if "drift" in key else 2
            lines.append(f"| {model} | " + " | ".join(_fmt(v, digits) for v in values) + " |")
    if teacher:
        lines += ["", "## Teacher continuations of held-out clips, before and after ERFT", "",
                  "Context = the long layout of each held-out clip (sink | sparse | motion), target = its last "
                  f"{teacher.get('target_latents', '')} latents, sampled with "
                  f"`{json.dumps(teacher.get('sampling', {}))}`; colours scored against all the clip's attributes "
                  "(named by its caption or not), PSNR against the true continuation (both decoded).", "",
                  "| model | clips | PSNR (dB) | background coverage | sprite presence | unnamed captions: sprite "
                  "presence |", "|---|---|---|---|---|---|"]
        for name in ("base", "teacher"):
            r = teacher[name]
            lines.append(f"| {name} | {r['all']['clips']} | {_fmt(r['all']['psnr_db'], 1)} | "
                         f"{_fmt(r['all']['background_coverage'])} | {_fmt(r['all']['sprite_presence'])} | "
                         f"{_fmt(r['unnamed_captions']['sprite_presence'])} |")
        truth = teacher["teacher"]["all"]
        lines.append(f"| true continuation | {truth['clips']} | – | {_fmt(truth['truth_background_coverage'])} | "
                     f"{_fmt(truth['truth_sprite_presence'])} | "
                     f"{_fmt(teacher['teacher']['unnamed_captions']['truth_sprite_presence'])} |")
        selection = teacher.get("selection")
        if selection:
            lines += ["", f"The teacher is the ERFT checkpoint of step {selection['step']}: of the run's step "
                      f"checkpoints, the one whose continuations of the {selection['clips']} held-out clips the "
                      "demo does not prompt with score best, by the lower of two ratios to the true continuations "
                      "(background coverage, sprite presence). Those clips are among the ones above.", "",
                      "| ERFT step | background / truth | sprites / truth | score |", "|---|---|---|---|"]
            for row in selection["rows"]:
                lines.append(f"| {row['step']} | {_fmt(row['background_coverage'] / row['truth_background_coverage'])}"
                             f" | {_fmt(row['sprite_presence'] / row['truth_sprite_presence'])} | "
                             f"{_fmt(row['score'])} |")
    lines += ["", "## Frame strips", "",
              f"One row per prompt (named, unnamed, alternating by clip); {STRIP_COLUMNS} frames spread over the "
              "video.", ""]
    for model, path in strips.items():
        lines += [f"**{model}**", "", f"![{model}]({path})", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in drawn]
    lines += ["", "## Stages", "", "| stage | seconds | command |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['seconds']} | `{s['command']}` |" for s in stages]
    lines += ["", "## Videos", ""]
    for name, folder in videos.items():
        links = [f"[{p.name}]({p.relative_to(out)})" for p in sorted(folder.glob("*.mp4"))]
        lines.append(f"- {name}: " + ", ".join(links))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"models": summary, "teacher": teacher, "stages": list(stages),
                                                  "settings": dict(settings), "elapsed_s": elapsed_s}, indent=2))
    return report


def claim_table(runs: Mapping[int, Mapping[str, Mapping[str, Any]]], models: Sequence[str],
                baseline: str = "sliding_window", subject: str = "context_forcing") -> str:
    """Markdown: for each claim metric, each model's mean ± sample standard deviation over the pipeline seeds
    (``runs[seed]`` = `summarize_models` of that seed), and the per-seed difference subject − baseline with a plain
    statement of whether its mean exceeds the spread (the larger of the two models' standard deviations)."""
    seeds = sorted(runs)
    lines = [f"Seeds of the whole pipeline: {', '.join(map(str, seeds))}.", "",
             "| metric | " + " | ".join(models) + f" | {subject} − {baseline} (per seed) | larger than the spread? |",
             "|---|" + "---|" * (len(models) + 2)]

    def stats(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    for key, label in CLAIM_METRICS:
        cells, spread = [], {}
        for model in models:
            values = [runs[s][model][key] for s in seeds if model in runs[s] and runs[s][model].get(key) is not None]
            if not values:
                cells.append("–")
                continue
            mean, std = stats(values)
            spread[model] = std
            cells.append(f"{mean:.3f} ± {std:.3f} (n={len(values)})")
        diffs = [runs[s][subject][key] - runs[s][baseline][key] for s in seeds
                 if runs[s].get(subject, {}).get(key) is not None and runs[s].get(baseline, {}).get(key) is not None]
        if diffs:
            mean, std = stats(diffs)
            largest = max(spread.get(subject, 0.0), spread.get(baseline, 0.0))
            verdict = "yes" if abs(mean) > largest else "no"
            cells += [", ".join(f"{d:+.3f}" for d in diffs) + f" (mean {mean:+.3f})",
                      f"{verdict}: |{mean:.3f}| vs {largest:.3f}"]
        else:
            cells += ["–", "–"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
