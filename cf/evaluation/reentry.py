"""Re-entry consistency: do attributes the prompt does not name survive a sprite's exit and re-entry?

Measured from a video's pixels alone (no ground-truth track), for the synthetic sprite world (data/synthetic.py):
when a caption leaves every attribute unnamed ("two shapes on a striped background"), a generator can only bring a
sprite back in its old colour by remembering it. Definition, for a video of T frames at ``fps``:

1. **Reference.** The background image B ``[H, W, 3]`` is the per-pixel temporal median of the first
   ``background_s`` seconds (:func:`cf.evaluation.ground_truth.estimate_background`); the reference identities
   c_1..c_K are the sprite colours of the first ``reference_s`` seconds
   (:func:`cf.evaluation.ground_truth.identity_colours`). Pixels of B that are at least half an identity colour
   (:func:`sprite_remnants`: a sprite that lingered in the median window) are replaced by B's median colour.
   Identity k's colour mass m_k(t) is the sum over frame t of
   :func:`cf.evaluation.ground_truth.colour_mass_map` (c_k against B); its reference mass M_k is the mean of m_k
   over the reference frames. A pixel is *claimed* by k when that map is positive there.
2. **Foreground.** A pixel is foreground when its colour is at least ``foreground_threshold`` (0–255 RGB distance)
   from every colour of the *background palette* (:func:`background_palette`: the colours of B less the sprite
   remnants, thinned to at most ``palette_size`` colours). Distance to the palette rather than to the pixel's own
   B(p): a texture that shifts is not foreground; a background whose colour drifts off its palette is (unexplained)
   foreground and lowers the score (:func:`cf.evaluation.ground_truth.reference_free_metrics` measures that drift
   separately). Per frame: F foreground pixels, E of them claimed by some identity, U = F − E unexplained, and
   O_k claimed by k and by no other identity.
3. **Slots.** What identity k's place holds at frame t is A_k = O_k + max(0, U − Σ_{j≠k} H_j): its own colour
   plus the unexplained foreground no other identity holds. An identity that re-enters mostly unexplained
   (O_j < A_j / 2 at its re-entry frame: something came back in a new colour) *holds* that arrival: H_j starts at
   0, grows over its scoring window (step 5) as the running maximum of the unexplained foreground available to it
   (U − Σ_{i≠j} H_i, capped at the largest M of the identities out at the arrival), and stays frozen after the
   window until j exits again; otherwise H_j = 0. So one new-colour arrival fills one slot, not every empty one
   (a second arrival within the first one's window is partly taken as part of it).
4. **Exit.** Identity k is *in* from the first frame with m_k ≥ ``reentry_fraction``·M_k. It *exits* at frame e
   when frames e .. e+G−1 (G = ``min_gap_s``·fps, rounded, at least 1) are all *empty* for it: m_k and A_k are
   both below ``exit_fraction``·M_k (its colour is gone and nothing unexplained of a sprite's size took its place;
   a sprite that changes colour in view is no exit). H_k drops to 0.
5. **Re-entry.** After an exit, k re-enters at the first frame r with A_k(r) ≥ ``reentry_fraction``·M_k:
   foreground of about the sprite's size in its colour or a new one. Its score is Σ O_k / Σ A_k over frames
   r .. r+W−1 (W = ``window_s``·fps, rounded, at least 1; cut at the video's end): 1 when k came back in its
   colour, 0 when it came back as a new colour. k is then *in* again and may exit again. An exit with no re-entry
   before the end counts in ``num_exits`` only. Which identity a new-colour arrival belongs to is a guess when
   several are out: first the first one whose threshold it reaches (on a tie, the one that left first); at the
   end of the window, the one whose M is closest to what it holds, among the holder and the identities that left
   before the arrival and are still out; and if the holder's own colour comes back while such an identity is
   out, the one of them that left first (the holder then has a re-entry of its own). A moved arrival keeps its
   frame and window; its score uses the slot as its holders saw it.

Summary: ``explained_after_reentry`` is the mean of the event scores; ``explained_before_exit`` is Σ E / Σ F over
the frames before the first exit of any identity (all frames when nothing exits): the same explained fraction at
the level the video starts from. Both are None when they have nothing to average (no re-entry; no foreground).
``explained_per_second`` is Σ E / Σ F per second of video (None where a second has no foreground).

Limits: colour is the only attribute (a sprite that comes back in the colour of *another* reference sprite is not
a re-entry of this slot); a sprite absent from the reference seconds is unexplained foreground wherever it is, and
no slot is empty while it is in view; an occlusion of at least ``min_gap_s`` by a differently coloured sprite reads
as an exit and a re-entry; a sprite that moves less than about its size during the first ``background_s`` seconds
is part of the median background and is no identity (on the dataset's clips, ``background_s`` covering the whole
clip finds more of them). Pixel counts include occlusion: while two sprites overlap, the one in front hides part of
the other. Counts of new-colour returns are approximate when sprites differ much in size (a held big sprite whose
visible area grows by half a small sprite's reads as an arrival), and on heavily blurred video
:func:`cf.evaluation.ground_truth.identity_colours` may take the blend of two touching sprites for one more
identity. Compare models on the same prompts, and against the dataset's own clips scored the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from cf.evaluation.ground_truth import (
    ColourMatching,
    colour_mass_map,
    frames_to_rgb255,
    reference_identities,
    unmix,
)

__all__ = ["sprite_remnants", "background_palette", "reentry_consistency"]

_FRAME_CHUNK = 32


def sprite_remnants(background: Tensor, identities: Tensor, matching: ColourMatching = ColourMatching()) -> Tensor:
    """Boolean ``[H, W]``: pixels of the background image ``[H, W, 3]`` that unmix as at least half an identity
    colour of ``identities`` ``[K, 3]`` against the typical (median) background colour: a sprite that lingered
    in the temporal median window."""
    pixels = background.reshape(-1, 3).float()
    typical = pixels.median(dim=0).values
    remnant = torch.zeros(pixels.shape[0], dtype=torch.bool)
    for colour in identities:
        alpha, residual = unmix(pixels, colour, typical)
        remnant |= (alpha >= 0.5) & (residual <= matching.max_residual)
    return remnant.reshape(background.shape[:2])


def background_palette(background: Tensor, identities: Tensor, matching: ColourMatching = ColourMatching(),
                       palette_size: int = 64, palette_tolerance: float = 8.0) -> Tensor:
    """Colours ``[P, 3]`` (0–255) that stand for the background image ``background`` ``[H, W, 3]``.

    Pixels of :func:`sprite_remnants` are left out; the rest are thinned by farthest-point sampling from the
    typical (median) colour: up to ``palette_size`` colours, stopping once every kept pixel is within
    ``palette_tolerance`` of a chosen one.
    """
    if palette_size < 1:
        raise ValueError(f"palette_size must be at least 1, got {palette_size}")
    pixels = background.reshape(-1, 3).float()
    typical = pixels.median(dim=0).values
    keep = ~sprite_remnants(background, identities, matching).reshape(-1)
    if keep.any():
        pixels = pixels[keep]
    chosen = [pixels[int((pixels - typical).norm(dim=-1).argmin())]]
    distance = (pixels - chosen[0]).norm(dim=-1)
    while len(chosen) < palette_size and float(distance.max()) > palette_tolerance:
        chosen.append(pixels[int(distance.argmax())])
        distance = torch.minimum(distance, (pixels - chosen[-1]).norm(dim=-1))
    return torch.stack(chosen)


def _pixel_counts(frames: Tensor | np.ndarray, identities: Tensor, background: Tensor, palette: Tensor,
                  foreground_threshold: float, matching: ColourMatching) -> dict[str, Tensor]:
    """Per-frame counts in one chunked pass: ``mass`` ``[T, K]`` (m_k), ``foreground`` ``[T]`` (F), ``explained``
    ``[T]`` (E) and ``own`` ``[T, K]`` (O_k)."""
    num_frames, k = int(frames.shape[0]), int(identities.shape[0])
    height, width = background.shape[:2]
    mass, own = torch.zeros(num_frames, k), torch.zeros(num_frames, k)
    foreground, explained = torch.zeros(num_frames), torch.zeros(num_frames)
    for start in range(0, num_frames, _FRAME_CHUNK):
        chunk = frames_to_rgb255(frames[start : start + _FRAME_CHUNK])  # [t, H, W, 3]
        if chunk.shape[1:3] != (height, width):
            raise ValueError(f"frames are {tuple(chunk.shape[1:3])} but the background is {(height, width)}")
        t = chunk.shape[0]
        nearest = torch.cdist(chunk.reshape(-1, 3), palette).amin(dim=1).reshape(t, height, width)
        fg = nearest >= foreground_threshold  # [t, H, W]
        foreground[start : start + t] = fg.sum(dim=(1, 2)).float()
        if k == 0:
            continue
        fractions = torch.stack([colour_mass_map(chunk, c, background, matching) for c in identities])  # [K,t,H,W]
        mass[start : start + t] = fractions.sum(dim=(2, 3)).T
        claimed = fractions > 0
        claim_count = claimed.sum(dim=0)  # [t, H, W]
        explained[start : start + t] = (fg & (claim_count > 0)).sum(dim=(1, 2)).float()
        own[start : start + t] = (fg & claimed & (claim_count == 1)).sum(dim=(2, 3)).T.float()
    return {"mass": mass, "foreground": foreground, "explained": explained, "own": own}


def _detect_events(mass: Tensor, own: Tensor, unexplained: Tensor, reference_mass: Tensor, exit_fraction: float,
                   reentry_fraction: float, gap: int, window: int) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """Steps 3–5 of the module docstring over ``mass``, ``own`` ``[T, K]`` and ``unexplained`` ``[T]``.

    Returns the re-entries (``identity``, ``exit_frame``, ``reentry_frame``, ``window_frames``, ``explained``) and
    the exits with no re-entry ``(identity, exit_frame)``.
    """
    num_frames, k = mass.shape
    reference = reference_mass.tolist()
    enter = [reentry_fraction * m for m in reference]
    empty_level = [exit_fraction * m for m in reference]
    mass_l, own_l, unexplained_l = mass.tolist(), own.tolist(), unexplained.tolist()
    slots = torch.zeros(num_frames, k)  # A_k as seen by identity k
    state = ["pending"] * k
    run, exit_at, held, hold_until, hold_cap = [0] * k, [0] * k, [0.0] * k, [-1] * k, [0.0] * k
    taken: list[dict[str, Any] | None] = [None] * k  # the new-colour arrival an identity holds
    events: list[dict[str, Any]] = []

    def hand_over(i: int, j: int, t: int) -> None:
        """Identity i's arrival becomes out-identity j's re-entry from frame t on; i is out again."""
        event = taken[i]
        event["holders"].append((i, t))
        event.update(identity=j, exit_frame=exit_at[j])
        state[j], taken[j], held[j], hold_until[j], hold_cap[j] = "in", event, held[i], hold_until[i], hold_cap[i]
        state[i], taken[i], held[i], hold_until[i], run[i] = "out", None, 0.0, -1, 0
        for m in (i, j):  # frame t's slots as the new holdings see them
            slots[t, m] = own_l[t][m] + max(0.0, unexplained_l[t] - (sum(held) - held[m]))

    for t in range(num_frames):
        u = unexplained_l[t]
        for i in sorted(range(k), key=lambda j: (state[j] != "out", exit_at[j], j)):  # out first, longest out first
            free = max(0.0, u - (sum(held) - held[i]))
            slots[t, i] = slot = own_l[t][i] + free
            if state[i] == "pending":
                state[i] = "in" if mass_l[t][i] >= enter[i] else "pending"
                continue
            if state[i] == "out":
                if slot >= enter[i]:
                    event = {"identity": i, "exit_frame": exit_at[i], "reentry_frame": t, "holders": []}
                    events.append(event)
                    if own_l[t][i] < 0.5 * slot:  # mostly a new colour: hold it through the window
                        taken[i], hold_until[i] = event, t + window - 1
                        hold_cap[i] = max(reference[j] for j in range(k) if state[j] == "out")
                    state[i] = "in"
            elif taken[i] is not None and (waiting := [j for j in range(k) if state[j] == "out"
                                                       and exit_at[j] <= taken[i]["reentry_frame"]]):
                if mass_l[t][i] >= enter[i]:  # i's own colour is back: the arrival was another identity's
                    first_out = min(waiting, key=lambda m: (exit_at[m], m))
                    back_from = exit_at[i]
                    hand_over(i, first_out, t)
                    events.append({"identity": i, "exit_frame": back_from, "reentry_frame": t, "holders": []})
                    state[i] = "in"
                    continue
                if t == hold_until[i] + 1:  # the arrival is in: it goes to the identity closest to its size
                    closest = min([i] + waiting, key=lambda m: (abs(reference[m] - held[i]), m != i))
                    if closest != i:
                        hand_over(i, closest, t)
                        continue
            if state[i] == "in":
                run[i] = run[i] + 1 if mass_l[t][i] < empty_level[i] and slot < empty_level[i] else 0
                if run[i] == gap:
                    state[i], exit_at[i], run[i], held[i], hold_until[i], taken[i] = \
                        "out", t - gap + 1, 0, 0.0, -1, None
            if t <= hold_until[i]:
                held[i] = max(held[i], min(free, hold_cap[i]))

    for event in events:
        i, start = event["identity"], event["reentry_frame"]
        stop = min(num_frames, start + window)
        slot = slots[start:stop, i].clone()
        since = start
        for holder, until in event.pop("holders"):  # before a hand-over, the slot as its holder saw it
            part = slice(since, min(stop, until))
            slot[part.start - start : part.stop - start] = own[part, i] + slots[part, holder] - own[part, holder]
            since = min(stop, until)
        event["window_frames"] = stop - start
        event["explained"] = _ratio(own[start:stop, i], slot)
    lost = [(i, exit_at[i]) for i in range(k) if state[i] == "out"]
    return events, lost


def _ratio(numerator: Tensor, denominator: Tensor) -> float | None:
    total = float(denominator.sum())
    return float(numerator.sum()) / total if total > 0 else None


def reentry_consistency(frames: Tensor | np.ndarray, fps: float, reference_s: float = 1.0,
                        background_s: float = 4.0, min_gap_s: float = 0.5, window_s: float = 2.0,
                        exit_fraction: float = 0.25, reentry_fraction: float = 0.5,
                        foreground_threshold: float = 40.0, min_contrast: float = 40.0,
                        palette_size: int = 64, palette_tolerance: float = 8.0,
                        matching: ColourMatching = ColourMatching()) -> dict[str, Any]:
    """Whether sprites come back in their colours after leaving the frame (definition: module docstring).

    ``frames``: uint8 ``[T, H, W, 3]`` (numpy or torch) or float ``[T, 3, H, W]`` in [0, 1], frame t at t / fps.
    ``min_contrast`` is :func:`cf.evaluation.ground_truth.identity_colours`'s threshold for reference pixels.

    Returns a JSON-able dict (no NaN): ``reference_frames``, ``background_frames``, ``identity_colours``
    (``[K][3]``), ``reference_mass`` (``[K]``, M_k), ``num_exits``, ``num_reentries``, ``explained_before_exit``,
    ``explained_after_reentry`` (float or None), ``events`` (per re-entry: ``identity``, ``colour``,
    ``exit_frame``, ``reentry_frame``, ``exit_s``, ``reentry_s``, ``window_frames``, ``explained``),
    ``exits_without_reentry`` (per exit with no re-entry: ``identity``, ``exit_frame``, ``exit_s``),
    ``explained_per_second`` and ``foreground_per_second`` (mean F per frame) lists, one entry per second.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 < exit_fraction <= reentry_fraction:
        raise ValueError(f"need 0 < exit_fraction <= reentry_fraction, got {exit_fraction}, {reentry_fraction}")
    if min_gap_s <= 0 or window_s <= 0 or reference_s <= 0:
        raise ValueError(f"reference_s, min_gap_s and window_s must be positive, got {reference_s}, {min_gap_s}, "
                         f"{window_s}")
    num_frames = int(frames.shape[0])
    num_reference, num_background, background, identities = reference_identities(
        frames, fps, reference_s, background_s, min_contrast, matching)
    palette = background_palette(background, identities, matching, palette_size, palette_tolerance)
    typical = background.reshape(-1, 3).median(dim=0).values
    cleaned = torch.where(sprite_remnants(background, identities, matching)[..., None], typical, background)
    counts = _pixel_counts(frames, identities, cleaned, palette, foreground_threshold, matching)
    reference_mass = counts["mass"][:num_reference].mean(dim=0)  # [K]

    gap = max(1, round(min_gap_s * fps))
    window = max(1, round(window_s * fps))
    events, unreturned = _detect_events(counts["mass"], counts["own"], counts["foreground"] - counts["explained"],
                                        reference_mass, exit_fraction, reentry_fraction, gap, window)
    colours = [[float(round(v, 1)) for v in c] for c in identities.tolist()]
    events = [{"identity": e["identity"], "colour": colours[e["identity"]], "exit_frame": e["exit_frame"],
               "reentry_frame": e["reentry_frame"], "exit_s": e["exit_frame"] / fps,
               "reentry_s": e["reentry_frame"] / fps, "window_frames": e["window_frames"], "explained": e["explained"]}
              for e in events]
    lost = [{"identity": i, "exit_frame": e, "exit_s": e / fps} for i, e in unreturned]
    events.sort(key=lambda e: (e["reentry_frame"], e["identity"]))
    lost.sort(key=lambda e: (e["exit_frame"], e["identity"]))

    exits = [e["exit_frame"] for e in events] + [e["exit_frame"] for e in lost]
    first_exit = min(exits) if exits else num_frames
    scores = [e["explained"] for e in events if e["explained"] is not None]
    seconds = torch.div(torch.arange(num_frames, dtype=torch.float64), fps).floor().long()
    per_second, foreground_per_second = [], []
    for s in range(int(seconds[-1]) + 1):
        chosen = seconds == s
        per_second.append(_ratio(counts["explained"][chosen], counts["foreground"][chosen]))
        foreground_per_second.append(float(counts["foreground"][chosen].mean()) if chosen.any() else 0.0)
    return {
        "reference_frames": num_reference,
        "background_frames": num_background,
        "identity_colours": colours,
        "reference_mass": [float(m) for m in reference_mass.tolist()],
        "num_exits": len(exits),
        "num_reentries": len(events),
        "explained_before_exit": _ratio(counts["explained"][:first_exit], counts["foreground"][:first_exit]),
        "explained_after_reentry": sum(scores) / len(scores) if scores else None,
        "events": events,
        "exits_without_reentry": lost,
        "explained_per_second": per_second,
        "foreground_per_second": foreground_per_second,
    }

