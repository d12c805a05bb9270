"""Flashback / reset detector on the similarity-to-first-frame curve.

A *flashback* (Context Forcing, Fig. 8: LongVideo models that "reset to frame 0") shows up as a sudden rise of
``cos(f_0, f_k)`` after the curve has declined. The detector:

1. smooths the per-frame curve with a centred moving average of ``smoothing_s`` seconds (shrinking at the ends);
2. scans forward; at frame j it takes the trough i = argmin of the smoothed curve over the last ``max_rise_s``
   seconds (not before the end of the previous event) and flags an event when
   - the rise ``s[j] − s[i]`` is at least ``min_rise`` (sudden: it happened within ``max_rise_s``), and
   - the prior decline ``max(s[previous event end .. i]) − s[i]`` is at least ``min_decline``;
3. the event ends at the highest smoothed value within ``max_rise_s`` of the trough; its reported frame is the frame
   with the largest one-frame increase of the raw curve between trough and peak (the frame the video jumps back).

Thresholds are in the curve's units (cosine similarity in [−1, 1], not ×100). A smooth decline never rises, and
noise is averaged away before thresholds apply; slow natural returns (e.g. a camera panning back) rise over more
than ``max_rise_s`` and are not flagged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlashbackEvent:
    """One detected reset. Strength and decline are in similarity units; frames are 0-based."""

    frame: int  # frame the curve jumps up at (largest raw one-frame increase)
    time_s: float  # frame / fps
    strength: float  # smoothed rise, trough -> peak
    prior_decline: float  # smoothed drop, previous maximum -> trough
    recovery: float  # strength / prior_decline: 1.0 means back to the pre-decline similarity
    start_frame: int  # trough of the smoothed curve
    end_frame: int  # peak of the smoothed curve

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def moving_average(values: Tensor, window: int) -> Tensor:
    """Centred moving average of ``[T]`` over ``window`` frames; the window shrinks at both ends."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1 frame, got {window}")
    x = values.double()
    n = x.shape[0]
    if window == 1 or n == 0:
        return x.clone()
    prefix = torch.cat([x.new_zeros(1), x.cumsum(0)])
    idx = torch.arange(n)
    lo = (idx - window // 2).clamp(min=0)
    hi = (idx + (window - 1) // 2 + 1).clamp(max=n)
    return (prefix[hi] - prefix[lo]) / (hi - lo).double()


def detect_flashbacks(similarity: Tensor, fps: float, smoothing_s: float = 0.5, min_decline: float = 0.1,
                      min_rise: float = 0.1, max_rise_s: float = 1.0) -> list[FlashbackEvent]:
    """Flag sudden rises after a decline in a similarity-to-first-frame curve ``[T]`` sampled at ``fps``."""
    if similarity.ndim != 1:
        raise ValueError(f"similarity must be a 1-D per-frame curve [T], got shape {tuple(similarity.shape)}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if min_rise <= 0 or min_decline < 0:
        raise ValueError(f"need min_rise > 0 and min_decline >= 0, got {min_rise} and {min_decline}")
    window = max(1, round(smoothing_s * fps))
    lookback = max(1, round(max_rise_s * fps))
    if lookback < window:
        raise ValueError(
            f"max_rise_s ({max_rise_s} s = {lookback} frames) must be at least the smoothing window "
            f"({smoothing_s} s = {window} frames): smoothing spreads a one-frame jump over the window"
        )
    raw = similarity.detach().double().cpu()
    if torch.isnan(raw).any():
        raise ValueError("similarity curve contains NaN; compute it from valid features")
    smooth = moving_average(raw, window)
    n = smooth.shape[0]
    events: list[FlashbackEvent] = []
    segment_start, j = 0, 1
    while j < n:
        lo = max(segment_start, j - lookback)
        trough = lo + int(torch.argmin(smooth[lo : j + 1]))
        rise = float(smooth[j] - smooth[trough])
        if rise >= min_rise:
            decline = float(smooth[segment_start : trough + 1].max() - smooth[trough])
            if decline >= min_decline:
                hi = min(n, trough + lookback + 1)
                peak = j + int(torch.argmax(smooth[j:hi]))
                first = max(trough, 1)
                jumps = raw[first : peak + 1] - raw[first - 1 : peak]
                frame = first + int(torch.argmax(jumps))
                strength = float(smooth[peak] - smooth[trough])
                events.append(FlashbackEvent(frame=frame, time_s=frame / fps, strength=strength,
                                             prior_decline=decline, recovery=strength / decline if decline else
                                             float("inf"), start_frame=trough, end_frame=peak))
                segment_start, j = peak, peak + 1
                continue
        j += 1
    return events
