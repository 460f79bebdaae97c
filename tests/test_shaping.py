"""rewards.shaping against hand-computed values."""
import math

import pytest
import torch

from rewards.shaping import length_budget, progress, schedule, shape_rewards


def test_linear_schedule():
    assert torch.allclose(schedule("linear", 4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_geometric_schedule():
    eps = 0.01
    s = schedule("geometric", 2, eps=eps)
    # s(1) = (0.01^0.5 - 0.01) / 0.99 = (0.1 - 0.01) / 0.99
    assert torch.allclose(s, torch.tensor([1.0, 0.09 / 0.99, 0.0]), atol=1e-7)
    s4 = schedule("geometric", 4, eps=eps)
    assert s4[0] == 1.0 and s4[-1] == 0.0 and torch.all(s4[1:] < s4[:-1])
    # geometric leaves less distance than linear after every intermediate layer
    assert torch.all(s4[1:-1] < schedule("linear", 4)[1:-1])
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule("cosine", 4)


def test_length_budget():
    assert torch.allclose(length_budget([0, 2, 4], 4, 4, 12), torch.tensor([4.0, 8.0, 12.0]))


def test_progress_safe_denominator():
    r = torch.tensor([[0.5, 1.0], [3.0, 0.2]])
    r0 = torch.tensor([0.0, 1.0])
    rK = torch.tensor([1.0, 1.0])  # second image: rK == r0
    p = progress(r, r0, rK, eps=1e-4, clip=(-1.0, 2.0))
    assert torch.allclose(p[0], torch.tensor([0.5, 1.0]))
    assert torch.allclose(p[1], torch.tensor([2.0, -1.0]))  # +2/1e-4 and -0.8/1e-4, clipped
    # a negative denominator keeps its sign: r0=1, rK=0, r=0.25 -> p = 0.75
    assert torch.allclose(progress(torch.tensor([[0.25]]), torch.tensor([1.0]), torch.tensor([0.0])),
                          torch.tensor([[0.75]]))


def test_shape_rewards_hand_computed():
    K = 2
    sched = schedule("linear", K)  # [1, 0.5, 0]
    layers = [1, 2]
    rewards = torch.tensor([[[0.8, 0.5], [1.2, 1.0]]])  # [B=1, L=2, n=2]
    lengths = torch.tensor([[[10.0, 6.0], [12.0, 20.0]]])
    r0, rK = torch.tensor([0.4]), torch.tensor([1.2])
    shaped, p = shape_rewards(rewards, layers, K, r0, rK, sched, lambda_grad=0.5, lambda_len=2.0,
                              lengths=lengths, len_min=4, len_max=16)
    # progress: (r - 0.4) / 0.8
    assert torch.allclose(p, torch.tensor([[[0.5, 0.125], [1.0, 0.75]]]))
    # layer 1: target 1 - s(1) = 0.5, budget L_1 = 4 + 12 * 1/2 = 10
    #   c0: 0.8 - 0.5*|0.5-0.5| - 2*max(0, 10-10)/16 = 0.8
    #   c1: 0.5 - 0.5*|0.125-0.5| - 0 = 0.3125
    # layer 2 = K: no graduality term, budget 16
    #   c0: 1.2 - 0 = 1.2 ; c1: 1.0 - 2*(20-16)/16 = 0.5
    assert torch.allclose(shaped, torch.tensor([[[0.8, 0.3125], [1.2, 0.5]]]))
    assert math.isclose(float(shaped.sum()), 2.8125, rel_tol=1e-6)


def test_shape_rewards_rejects_bad_layers():
    with pytest.raises(ValueError, match="layers"):
        shape_rewards(torch.zeros(1, 1, 1), [5], 4, torch.zeros(1), torch.ones(1),
                      schedule("linear", 4), 1.0, 1.0, torch.zeros(1, 1, 1), 1, 2)


def test_embedding_progress_hand_computed():
    from rewards.shaping import embedding_progress

    e0 = torch.tensor([[1.0, 0.0]])  # D(e0, eK) = 1 - cos 90° = 1
    eK = torch.tensor([[0.0, 1.0]])
    c = torch.tensor([[[[1.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]]])  # [B=1, L=1, n=4, D=2]
    p = embedding_progress(c, e0, eK)
    # D(c, eK) = 1, 0, 1 - 1/sqrt(2), 1  ->  p = 0, 1, 1/sqrt(2), 0
    torch.testing.assert_close(p, torch.tensor([[[0.0, 1.0, 2 ** -0.5, 0.0]]]))
    # e0 == eK: the denominator is raised to eps and p is clipped
    far = embedding_progress(torch.tensor([[[[1.0, 0.0]]]]), eK, eK, eps=1e-4, clip=(-1.0, 2.0))
    assert float(far) == -1.0


def test_shape_rewards_takes_progress_measured_elsewhere():
    K, layers = 2, [1, 2]
    rewards = torch.tensor([[[0.8, 0.5], [1.2, 1.0]]])
    given = torch.tensor([[[0.5, 0.0], [1.0, 1.0]]])
    shaped, p = shape_rewards(rewards, layers, K, torch.tensor([0.4]), torch.tensor([1.2]), schedule("linear", K), 0.5, 0.0,
                              torch.zeros(1, 2, 2), 4, 16, progress_values=given)
    assert torch.equal(p, given)
    # layer 1 target 0.5: c1 pays 0.5 * |0 - 0.5|; layer K is judged on quality alone
    torch.testing.assert_close(shaped, torch.tensor([[[0.8, 0.25], [1.2, 1.0]]]))
    with pytest.raises(ValueError, match="progress_values"):
        shape_rewards(rewards, layers, K, torch.zeros(1), torch.ones(1), schedule("linear", K), 0.5, 0.0,
                      torch.zeros(1, 2, 2), 4, 16, progress_values=given[:, :1])
