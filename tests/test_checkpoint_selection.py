"""Choosing the teacher checkpoint: the score is the lower of two ratios to the truth; the best candidate wins."""

import pytest

from cf.evaluation.checkpoint_selection import continuation_fidelity, select_checkpoint


def summary(background: float, sprites: float) -> dict:
    return {"background_coverage": background, "sprite_presence": sprites,
            "truth_background_coverage": 0.8, "truth_sprite_presence": 0.5}


def test_fidelity_is_the_lower_ratio_to_the_truth() -> None:
    assert continuation_fidelity(summary(0.8, 0.25)) == pytest.approx(0.5)   # sprites lost: 0.25 / 0.5
    assert continuation_fidelity(summary(0.4, 0.5)) == pytest.approx(0.5)    # background lost: 0.4 / 0.8
    assert continuation_fidelity(summary(0.8, 0.75)) == pytest.approx(1.0)   # more sprites than the truth: background
    with pytest.raises(ValueError, match="truth_sprite_presence|sprite_presence 0"):
        continuation_fidelity({**summary(0.8, 0.5), "truth_sprite_presence": 0.0})


def test_the_best_candidate_is_chosen_and_every_one_is_measured() -> None:
    measured = {100: summary(0.6, 0.45), 150: summary(0.76, 0.45), 200: summary(0.8, 0.2), 250: summary(0.76, 0.45)}
    calls = []

    def measure(step: int) -> dict:
        calls.append(step)
        return measured[step]

    choice = select_checkpoint(sorted(measured), measure)
    assert calls == [100, 150, 200, 250]
    assert choice.best == 150 and choice.score == pytest.approx(0.9)  # min(0.95, 0.9); 250 ties and comes later
    assert [row["candidate"] for row in choice.rows] == [100, 150, 200, 250]
    assert [round(row["score"], 3) for row in choice.rows] == [0.75, 0.9, 0.4, 0.9]
    assert choice.rows[2]["sprite_presence"] == 0.2
    with pytest.raises(ValueError, match="no checkpoint"):
        select_checkpoint([], measure)
