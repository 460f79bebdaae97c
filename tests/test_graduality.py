"""Tests for rlrefine/metrics/graduality.py against hand-computed values."""

import math

import pytest
import torch

from rlrefine.metrics.graduality import graduality, layer_score, progress_curve, refinement_score


def linear_schedule(K):
    return [1 - k / K for k in range(K + 1)]


def geometric_schedule(K, eps=0.01):
    s = [(eps ** (k / K) - eps) / (1 - eps) for k in range(K + 1)]
    s[0], s[-1] = 1.0, 0.0
    return s


def test_perfectly_linear_refiner_has_g_one():
    # Latents moving along a line by equal steps: z_k = a + k v (per sample, random a, v).
    g = torch.Generator().manual_seed(0)
    N, K, M, d = 8, 4, 3, 5
    a = torch.randn(N, 1, M, d, generator=g)
    v = torch.randn(N, 1, M, d, generator=g)
    Z = a + torch.arange(K + 1, dtype=torch.float32).view(1, K + 1, 1, 1) * v  # [N, K+1, M, d]
    pi = progress_curve(Z)
    assert torch.allclose(pi, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]), atol=1e-6)
    assert graduality(pi, linear_schedule(K)) == pytest.approx(1.0, abs=1e-6)
    # exact with exact inputs
    assert graduality([0.0, 0.25, 0.5, 0.75, 1.0], linear_schedule(4)) == 1.0


def test_last_layer_does_all_the_work():
    # π = 0, 0, 0, 0, 1 against linear K = 4: |0 - 1/4|, |0 - 1/2|, |0 - 3/4| -> mean 1/2 -> G = 1/2
    assert graduality([0, 0, 0, 0, 1], linear_schedule(4)) == pytest.approx(0.5)
    # and the progress curve measures it that way: latents stay at z_0 until the last layer
    Z = torch.zeros(2, 5, 2)
    Z[:, :4] = torch.tensor([[1.0, 2.0], [3.0, -1.0]]).unsqueeze(1)
    assert torch.allclose(progress_curve(Z), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))


def test_geometric_schedule_by_hand():
    # K = 2, eps = 0.01: s(1) = (0.1 - 0.01) / 0.99 = 1/11, ideal π_1 = 10/11.
    # A refiner halfway at layer 1: G = 1 - |0.5 - 10/11| = 1 - 9/22 = 13/22.
    s = geometric_schedule(2)
    assert s[1] == pytest.approx(1 / 11)
    assert graduality([0.0, 0.5, 1.0], s) == pytest.approx(13 / 22)
    # On the geometric schedule exactly -> 1.
    assert graduality([1 - x for x in s], s) == pytest.approx(1.0)


def test_k1_is_one_by_definition():
    assert graduality([0.0, 1.0], [1.0, 0.0]) == 1.0


def test_graduality_can_go_negative_and_checks_lengths():
    assert graduality([0.0, -1.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="K\\+1"):
        graduality([0.0, 0.5, 1.0], [1.0, 0.0])


def test_progress_curve_cosine_distance_by_hand():
    # Unit vectors at angles 0, 60°, 90° to e_K = (1, 0) ... take e_0 at 90°, e_1 at 60°, e_2 at 0°:
    # D_cos(e_1, e_2) = 1 - cos 60° = 0.5, D_cos(e_0, e_2) = 1 -> π_1 = 0.5.
    e = torch.tensor([[[0.0, 1.0], [0.5, math.sqrt(3) / 2], [1.0, 0.0]]])
    assert torch.allclose(progress_curve(e, distance="cosine"), torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)
    # Euclidean for the same points: |e_1 - e_2| = 2 sin 30° = 1, |e_0 - e_2| = sqrt 2 -> 1 - 1/sqrt 2
    assert progress_curve(e)[1].item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_progress_curve_averages_samples_and_skips_degenerate_ones():
    e = torch.tensor(
        [
            [[4.0], [1.0], [0.0]],  # π_1 = 0.75
            [[2.0], [1.0], [0.0]],  # π_1 = 0.5
            [[5.0], [7.0], [5.0]],  # z_0 = z_K: undefined, left out
        ]
    )
    # pooled (default): 1 - (1 + 1) / (4 + 2); the mean of the per-sample ratios: (0.75 + 0.5) / 2
    assert torch.allclose(progress_curve(e), torch.tensor([0.0, 2 / 3, 1.0]))
    assert torch.allclose(progress_curve(e, estimator="mean"), torch.tensor([0.0, 0.625, 1.0]))
    with pytest.raises(ValueError, match="undefined"):
        progress_curve(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="distance"):
        progress_curve(e, distance="manhattan")
    with pytest.raises(ValueError, match="estimator"):
        progress_curve(e, estimator="median")


def test_pooled_progress_is_not_moved_by_a_sample_whose_start_is_near_its_end():
    # 9 samples exactly on schedule (pi_1 = 0.5) and one whose layer-0 point lies 0.01 from the end
    # while layer 1 is 1 away (pi_1 = -99): the mean of ratios collapses, the pooled curve barely moves
    on = [[[2.0], [1.0], [0.0]]] * 9
    e = torch.tensor(on + [[[0.01], [1.0], [0.0]]])
    assert progress_curve(e, estimator="mean")[1].item() == pytest.approx((9 * 0.5 - 99) / 10)
    assert progress_curve(e)[1].item() == pytest.approx(1 - 10 / 18.01)


def test_layer_score_hand_value():
    # weights linear 1..3: (1*0.2 + 2*0.4 + 3*0.9) / 6 = 3.7 / 6
    assert layer_score([0.2, 0.4, 0.9], [1, 2, 3]) == pytest.approx(3.7 / 6)
    assert layer_score(torch.tensor([0.2, 0.4, 0.9]), torch.tensor([0.0, 0.0, 1.0])) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        layer_score([0.1, 0.2], [1, 2, 3])


def test_refinement_score_hand_value():
    assert refinement_score(0.8, 0.6) == pytest.approx(0.7)
    assert refinement_score(0.8, 0.6, alpha=0.25) == pytest.approx(0.75 * 0.8 + 0.25 * 0.6)
    assert refinement_score(0.8, 0.6, alpha=0.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="alpha"):
        refinement_score(0.8, 0.6, alpha=1.5)
