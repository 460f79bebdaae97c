"""Tests for rlrefine/losses.py: each formula against a hand-computed value."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlrefine.losses import (
    coarse_to_fine_targets,
    dico_loss,
    kl_to_reference,
    latent_distances,
    latent_graduality_loss,
    layer_weights,
    per_token_kl,
    schedule,
    scst_loss,
    shape_rewards,
    xe_loss,
)

# ---------------------------------------------------------------------------- layer weights


def test_layer_weights_hand_values():
    assert layer_weights("linear", 4).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert torch.allclose(layer_weights("log", 3), torch.tensor([math.log(2), math.log(3), math.log(4)]))
    assert layer_weights("uniform", 3).tolist() == [1.0, 1.0, 1.0]
    assert layer_weights("final", 3).tolist() == [0.0, 0.0, 1.0]
    assert layer_weights("final", 1).tolist() == [1.0]


def test_layer_weights_unknown_kind_lists_choices():
    with pytest.raises(ValueError, match="linear.*log.*uniform.*final"):
        layer_weights("cubic", 3)
    with pytest.raises(ValueError):
        layer_weights("linear", 0)


# ---------------------------------------------------------------------------- re-exports


def test_schedule_and_shape_rewards_are_reexported_from_rewards():
    import rewards.shaping

    assert schedule is rewards.shaping.schedule
    assert shape_rewards is rewards.shaping.shape_rewards
    assert torch.allclose(schedule("linear", 4).float(), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # geometric, K = 2, eps = 0.01: s(1) = (0.01 ** 0.5 - 0.01) / 0.99 = 0.09 / 0.99
    s = schedule("geometric", 2, eps=0.01).float()
    assert torch.allclose(s, torch.tensor([1.0, 0.09 / 0.99, 0.0]), atol=1e-6)


# ---------------------------------------------------------------------------- XE


def test_xe_loss_hand_value():
    # V = 3, pad_id = 2, targets [1, 0, pad]; layer 0 logits all zero -> CE = ln 3 per token;
    # layer 1: t=0 logits [0, ln 2, 0] -> p(1) = 2/4 -> CE = ln 2;  t=1 logits [ln 3, 0, 0] -> p(0) = 3/5.
    pad = 2
    targets = torch.tensor([[1, 0, pad]])
    logits = torch.zeros(1, 2, 3, 3)
    logits[0, 1, 0] = torch.tensor([0.0, math.log(2), 0.0])
    logits[0, 1, 1] = torch.tensor([math.log(3), 0.0, 0.0])
    logits[0, :, 2] = torch.tensor([100.0, -100.0, 0.0])  # pad position: ignored
    weights = torch.tensor([1.0, 3.0])
    loss, per_layer = xe_loss(logits, targets, weights, pad_id=pad)
    ce0 = math.log(3)
    ce1 = (math.log(2) + math.log(5 / 3)) / 2
    assert per_layer.tolist() == pytest.approx([ce0, ce1], abs=1e-6)
    assert loss.item() == pytest.approx((ce0 + 3 * ce1) / 4, abs=1e-6)


def test_xe_loss_matches_token_mean_cross_entropy_per_layer():
    g = torch.Generator().manual_seed(0)
    B, L, T, V, pad = 3, 4, 5, 7, 0
    logits = torch.randn(B, L, T, V, generator=g, requires_grad=True)
    targets = torch.randint(1, V, (B, T), generator=g)
    targets[0, 3:] = pad
    targets[2, 1:] = pad
    w = layer_weights("linear", L)
    loss, per_layer = xe_loss(logits, targets, w, pad_id=pad)
    expected = torch.stack(
        [F.cross_entropy(logits[:, l].reshape(-1, V), targets.reshape(-1), ignore_index=pad) for l in range(L)]
    )
    assert torch.allclose(per_layer, expected.detach(), atol=1e-6)
    assert torch.allclose(loss, (w * expected).sum() / w.sum(), atol=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_xe_loss_per_layer_targets_match_cross_entropy_per_layer():
    g = torch.Generator().manual_seed(1)
    B, L, T, V, pad = 3, 2, 5, 7, 0
    logits = torch.randn(B, L, T, V, generator=g)
    targets = torch.randint(1, V, (B, L, T), generator=g)
    targets[:, 0, 2:] = pad  # layer 0: 2 tokens per row, layer 1: 5
    loss, per_layer = xe_loss(logits, targets, torch.tensor([1.0, 2.0]), pad_id=pad)
    expected = torch.stack(
        [F.cross_entropy(logits[:, l].reshape(-1, V), targets[:, l].reshape(-1), ignore_index=pad) for l in range(L)]
    )
    assert torch.allclose(per_layer, expected, atol=1e-6)
    assert loss.item() == pytest.approx((expected[0] + 2 * expected[1]).item() / 3, abs=1e-6)


def test_coarse_to_fine_targets_hand_value():
    eos, pad = 2, 0
    targets = torch.tensor([[5, 6, 7, 8, eos, pad, pad], [9, 10, eos, pad, pad, pad, pad]])
    fractions = 1 - schedule("linear", 4)[1:]  # 0.25, 0.5, 0.75, 1
    out = coarse_to_fine_targets(targets, fractions, eos, pad)
    assert out.shape == (2, 4, 7)
    # row 0: n = 4 tokens -> ceil(1, 2, 3, 4) tokens; row 1: n = 2 -> ceil(0.5, 1, 1.5, 2) = 1, 1, 2, 2
    assert out[0].tolist() == [[5, eos, pad, pad, pad, pad, pad], [5, 6, eos, pad, pad, pad, pad],
                               [5, 6, 7, eos, pad, pad, pad], [5, 6, 7, 8, eos, pad, pad]]
    assert out[1].tolist() == [[9, eos] + [pad] * 5, [9, eos] + [pad] * 5, [9, 10, eos] + [pad] * 4, [9, 10, eos] + [pad] * 4]
    # the last layer (fraction 1) is the caption itself
    assert torch.equal(out[:, -1], targets)
    with pytest.raises(ValueError, match="fractions"):
        coarse_to_fine_targets(targets, torch.tensor([0.0, 1.0]), eos, pad)


def test_xe_loss_shape_errors():
    with pytest.raises(ValueError, match="targets"):
        xe_loss(torch.zeros(2, 1, 4, 3), torch.zeros(2, 5, dtype=torch.long), torch.ones(1), pad_id=0)
    with pytest.raises(ValueError, match="weights"):
        xe_loss(torch.zeros(2, 2, 4, 3), torch.zeros(2, 4, dtype=torch.long), torch.ones(3), pad_id=0)


# ---------------------------------------------------------------------------- latent graduality


def _two_sample_latents():
    # K = 2, M = 1, d = 2. Sample 0: z0 = (4, 0), z1 = (1, 0), z2 = 0 -> d = [1, 1/4, 0].
    # Sample 1: z0 = (0, 3), z1 = (0, 1.5), z2 = 0 -> d = [1, 1/2, 0].
    Z = torch.zeros(2, 3, 1, 2)
    Z[0, 0, 0] = torch.tensor([4.0, 0.0])
    Z[0, 1, 0] = torch.tensor([1.0, 0.0])
    Z[1, 0, 0] = torch.tensor([0.0, 3.0])
    Z[1, 1, 0] = torch.tensor([0.0, 1.5])
    return Z


def test_latent_distances_hand_value():
    d = latent_distances(_two_sample_latents())
    assert torch.allclose(d, torch.tensor([[1.0, 0.25, 0.0], [1.0, 0.5, 0.0]]))


def test_latent_distances_frobenius_over_slots():
    # M = 2 slots: ‖(3, 4)‖ over both slots = 5.
    Z = torch.zeros(1, 3, 2, 1)
    Z[0, 0, :, 0] = torch.tensor([6.0, 8.0])  # ‖z0 - z2‖ = 10
    Z[0, 1, :, 0] = torch.tensor([3.0, 4.0])  # ‖z1 - z2‖ = 5
    assert torch.allclose(latent_distances(Z), torch.tensor([[1.0, 0.5, 0.0]]))


def test_latent_distances_degenerate_sample_is_finite():
    Z = torch.zeros(1, 3, 2, 2)
    assert torch.isfinite(latent_distances(Z)).all()


def test_latent_graduality_loss_hand_value():
    Z = _two_sample_latents().requires_grad_(True)
    sched = torch.tensor([1.0, 0.5, 0.0])  # linear, K = 2
    loss, mean_d = latent_graduality_loss(Z, sched)
    # mean over the one interior layer and 2 samples of (d_1 - 0.5)^2 = ((-0.25)^2 + 0) / 2
    assert loss.item() == pytest.approx(0.03125)
    assert torch.allclose(mean_d, torch.tensor([1.0, 0.375, 0.0]))
    loss.backward()
    assert torch.isfinite(Z.grad).all()


def test_latent_graduality_loss_k1_is_zero_and_shape_checked():
    Z = torch.randn(2, 2, 3, 4)
    loss, _ = latent_graduality_loss(Z, torch.tensor([1.0, 0.0]))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="sched"):
        latent_graduality_loss(torch.randn(2, 4, 3, 4), torch.tensor([1.0, 0.5, 0.0]))


# ---------------------------------------------------------------------------- DiCO

# τ = 5 ln 3, so reward gaps of 0.2 and 0.4 give softmax weights 3 : 9.
TAU = 5 * math.log(3)
BETA = 0.2
REWARDS = torch.tensor([[0.5, 0.9, 0.7], [0.3, 0.3, 0.1]])  # row 1: tie between 0 and 1 -> 0 wins
POLICY = torch.tensor([[-3.0, -2.0, -4.0], [-5.0, -6.0, -7.0]])
REF = torch.tensor([[-3.5, -2.5, -3.0], [-5.0, -5.0, -8.0]])


def test_dico_loss_hand_computed_2x3():
    loss, m = dico_loss(POLICY, REF, REWARDS, beta=BETA, tau=TAU)
    # Row 0: c = 1; gaps to c: j=0 0.4, j=2 0.2 -> γ = [0.75, 0, 0.25].
    # Row 1: c = 0 (tie, lowest index); gaps: j=1 0, j=2 0.2 -> γ = [0, 0.25, 0.75].
    assert m["chosen_index"].tolist() == [1, 0]
    assert torch.allclose(m["gamma"], torch.tensor([[0.75, 0.0, 0.25], [0.0, 0.25, 0.75]]), atol=1e-6)
    # h0 = (-2 - (0.75*-3 + 0.25*-4)) - (-2.5 - (0.75*-3.5 + 0.25*-3)) = 1.25 - 0.875 = 0.375
    # h1 = (-5 - (0.25*-6 + 0.75*-7)) - (-5 - (0.25*-5 + 0.75*-8)) = 1.75 - 2.25 = -0.5
    assert torch.allclose(m["h"], torch.tensor([0.375, -0.5]), atol=1e-6)
    expected = (math.log1p(math.exp(-BETA * 0.375)) + math.log1p(math.exp(BETA * 0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx((0.2 * 0.5 + 0.2 * 0.0) / 2)
    assert m["rewards/rejected"] == pytest.approx((0.2 * 0.125 + 0.2 * 0.5) / 2)
    assert m["rewards/margins"] == pytest.approx(-0.0125)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-3.5)
    assert m["logps/rejected"] == pytest.approx(-5.0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert isinstance(m[key], float)


def test_dico_gamma_sign_follows_reference_code():
    # Larger reward gap to the winner -> larger weight (DiCO's softmax(τ (r_w - r_j)), τ > 0).
    _, m = dico_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([[0.9, 0.8, 0.5, 0.1]]), beta=0.2, tau=10.0)
    g = m["gamma"][0]
    assert g[0] == 0 and g[1] < g[2] < g[3]
    assert g.sum().item() == pytest.approx(1.0)
    # τ = 0: uniform over the losers.
    _, m0 = dico_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([[0.9, 0.8, 0.5, 0.1]]), beta=0.2, tau=0.0)
    assert torch.allclose(m0["gamma"][0], torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))


def test_dico_ties_lowest_index_wins():
    r = torch.tensor([[0.2, 0.7, 0.7, 0.7], [0.5, 0.5, 0.5, 0.5], [0.1, 0.0, 0.3, 0.3]])
    _, m = dico_loss(torch.zeros(3, 4), torch.zeros(3, 4), r, beta=0.1, tau=1.0)
    assert m["chosen_index"].tolist() == [1, 0, 2]
    # All-equal row: uniform weights over the three losers.
    assert torch.allclose(m["gamma"][1], torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))


def test_dico_gradient_sign():
    policy = POLICY.clone().requires_grad_(True)
    loss, m = dico_loss(policy, REF, REWARDS, beta=BETA, tau=TAU)
    loss.backward()
    chosen = m["chosen_index"]
    rows = torch.arange(2)
    # Increasing log π of the chosen caption lowers the loss; of a rejected one raises it.
    assert (policy.grad[rows, chosen] < 0).all()
    gamma = m["gamma"]
    assert (policy.grad[gamma > 0] > 0).all()
    # and a finite-difference step confirms it
    bumped = POLICY.clone()
    bumped[rows, chosen] += 0.1
    assert dico_loss(bumped, REF, REWARDS, beta=BETA, tau=TAU)[0] < loss.detach()
    # no gradient into the reference or the rewards
    ref = REF.clone().requires_grad_(True)
    rew = REWARDS.clone().requires_grad_(True)
    dico_loss(POLICY.clone().requires_grad_(True), ref, rew, beta=BETA, tau=TAU)[0].backward()
    assert ref.grad is None and rew.grad is None


def test_dico_policy_equal_to_reference_gives_log2():
    loss, m = dico_loss(REF.clone(), REF, REWARDS, beta=BETA, tau=TAU)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-7)


def test_dico_input_checks():
    with pytest.raises(ValueError, match="2 candidates"):
        dico_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), beta=0.1, tau=1.0)
    with pytest.raises(ValueError, match="shape"):
        dico_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 3), beta=0.1, tau=1.0)


# ---------------------------------------------------------------------------- SCST


def test_scst_greedy_baseline_hand_value():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    rewards = torch.tensor([[1.0, 0.5], [0.2, 0.8]])
    greedy = torch.tensor([0.6, 0.5])
    loss, m = scst_loss(logps, rewards, baseline="greedy", greedy_rewards=greedy)
    # A = [[0.4, -0.1], [-0.3, 0.3]]; A * logp = [-0.4, 0.2, 0.9, -1.2]; loss = -mean = 0.125
    assert loss.item() == pytest.approx(0.125)
    assert m["scst/baseline"] == pytest.approx(0.55)
    loss.backward()
    # gradient = -A / 4: samples above the baseline get their log-prob pushed up
    assert torch.allclose(logps.grad, -torch.tensor([[0.4, -0.1], [-0.3, 0.3]]) / 4)


def test_scst_leave_one_out_mean_baseline_hand_value():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    loss, m = scst_loss(logps, rewards, baseline="mean")
    # b = [(2+6)/2, (1+6)/2, (1+2)/2] = [4, 3.5, 1.5]; A = [-3, -1.5, 4.5]
    # A * logp = [3, 3, -13.5], mean = -2.5 -> loss = 2.5
    assert loss.item() == pytest.approx(2.5)
    assert m["scst/advantage"] == pytest.approx(0.0)
    # length-normalised: logp / len = [-1, -1, -1] -> A * ℓ sums to 0
    loss_len, _ = scst_loss(logps, rewards, baseline="mean", lengths=torch.tensor([[1, 2, 3]]))
    assert loss_len.item() == pytest.approx(0.0, abs=1e-7)


def test_scst_input_checks():
    with pytest.raises(ValueError, match="greedy_rewards"):
        scst_loss(torch.zeros(2, 3), torch.zeros(2, 3), baseline="greedy")
    with pytest.raises(ValueError, match="greedy.*mean"):
        scst_loss(torch.zeros(2, 3), torch.zeros(2, 3), baseline="median")
    with pytest.raises(ValueError, match="n >= 2"):
        scst_loss(torch.zeros(2, 1), torch.zeros(2, 1), baseline="mean")


# ---------------------------------------------------------------------------- KL


def test_kl_to_reference_is_mean_log_ratio():
    pol = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    ref = torch.tensor([[-1.5, -2.0], [-2.0, -5.0]])
    assert kl_to_reference(pol, ref).item() == pytest.approx((0.5 + 0.0 - 1.0 + 1.0) / 4)


def test_per_token_kl_k3_hand_value():
    pol = torch.log(torch.tensor([[0.5, 0.5, 0.9]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1, 1, 0]])
    kl = per_token_kl(pol, ref, mask)
    # ρ = ln(0.25/0.5) = -ln 2: e^ρ - ρ - 1 = 0.5 + ln 2 - 1; equal log-probs -> 0; masked -> 0
    assert kl[0].tolist() == pytest.approx([math.log(2) - 0.5, 0.0, 0.0], abs=1e-6)
    assert (kl >= 0).all()
    kl.sum().backward()
    assert pol.grad is not None


# ------------------------------------------------------------------------------------------ GRPO
def test_group_advantages_hand_computed():
    from rlrefine.losses import group_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3
    # group 1: mean 2, std (Bessel) 1 -> (-1, 0, 1) / 1.0001; group 2: all tie -> 0 / 1e-4 = 0
    torch.testing.assert_close(group_advantages(r, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / 1.0001)
    torch.testing.assert_close(group_advantages(r, 3, "none"), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    batch_std = float(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]).std())  # 1.7224...
    torch.testing.assert_close(group_advantages(r, 3, "batch"), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


def test_grpo_loss_hand_computed():
    from rlrefine.losses import grpo_loss

    # one completion of 2 tokens, the policy moved by log 1.5 on token 0 (ratio 1.5 > 1 + 0.2: clipped for A > 0)
    logp = torch.tensor([[math.log(0.6), math.log(0.5)]])
    old = torch.tensor([[math.log(0.4), math.log(0.5)]])
    mask = torch.tensor([[1.0, 1.0]])
    loss, m = grpo_loss(logp, old, None, torch.tensor([2.0]), mask, beta=0.0, epsilon=0.2, loss_type="grpo")
    # token 0: -min(1.5 * 2, 1.2 * 2) = -2.4; token 1: -min(1 * 2, 1 * 2) = -2 -> mean -2.2
    assert loss.item() == pytest.approx(-2.2)
    assert m["clip_ratio/high_mean"] == pytest.approx(0.5) and m["clip_ratio/low_mean"] == 0.0
    # with the k3 KL to a reference: ref/policy = 0.3/0.6 on token 0, 1 on token 1 -> kl_0 = 0.5 - ln 0.5 - 1
    ref = torch.tensor([[math.log(0.3), math.log(0.5)]])
    loss, m = grpo_loss(logp, old, ref, torch.tensor([2.0]), mask, beta=0.1, epsilon=0.2, loss_type="grpo")
    kl0 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx((-2.4 + 0.1 * kl0 - 2.0) / 2)
    assert m["kl"] == pytest.approx(kl0 / 2)


def _trl_loss(logp, old, ref, adv, mask, beta, eps, eps_high, loss_type):
    """TRL's own GRPOTrainer._compute_loss on these per-token log-probs (the model call replaced by them)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    N, T = logp.shape
    acc = SimpleNamespace(num_processes=1, reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                          gather_for_metrics=lambda t: t, sync_gradients=True)
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, args=args, loss_type=loss_type, epsilon_low=eps,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=T,
        accelerator=acc, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask.long(), "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trls(loss_type, beta):
    from rlrefine.losses import group_advantages, grpo_loss

    g = torch.Generator().manual_seed(0)
    N, T = 8, 7
    logp = -torch.rand(N, T, generator=g) * 3
    old = logp + 0.3 * torch.randn(N, T, generator=g)  # ratios on both sides of the clip range
    ref = logp + 0.5 * torch.randn(N, T, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = group_advantages(torch.randn(N, generator=g), 4)
    ours, _ = grpo_loss(logp, old, ref, adv, mask, beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type)
    theirs = _trl_loss(logp, old, ref, adv, mask, beta, 0.2, 0.28, loss_type)
    assert abs(ours.item() - theirs.item()) < 1e-6, (ours.item(), theirs.item())


def test_group_advantages_equal_trls_nanstd():
    from trl.trainer.utils import nanstd

    from rlrefine.losses import group_advantages

    r = torch.randn(12, generator=torch.Generator().manual_seed(1))
    mean = r.view(-1, 4).mean(1).repeat_interleave(4)
    expected = (r - mean) / (nanstd(r.view(-1, 4), dim=1).repeat_interleave(4) + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(r, 4, "batch"), (r - mean) / (nanstd(r) + 1e-4), atol=1e-6, rtol=0)


def test_matching_losses_by_hand():
    """Two groups: (true 0, false 1, false 2) and (true 3, false 4); true and false captions weigh half each."""
    import math

    from rlrefine.losses import matching_losses

    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, 3.0])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    true_of = torch.tensor([-1, 0, 0, -1, 3])
    bce = lambda l, y: -(y * math.log(1 / (1 + math.exp(-l))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-l))))  # noqa: E731
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    match, pairwise = matching_losses(logits, target, true_of)
    want_match = (bce(2, 1) + bce(1, 1)) / 4 + (bce(0, 0) + bce(-1, 0) + bce(3, 0)) / 6
    want_pair = (softplus(0 - 2) + softplus(-1 - 2) + softplus(3 - 1)) / 3
    assert match.item() == pytest.approx(want_match, rel=1e-6) and pairwise.item() == pytest.approx(want_pair, rel=1e-6)
    only_true = matching_losses(logits[:1], target[:1], torch.tensor([-1]))
    assert only_true[1].item() == 0.0 and only_true[0].item() == pytest.approx(bce(2, 1) / 2, rel=1e-6)


def test_word_emphasis_loss_by_hand():
    """Caption 0 holds a chosen word (id 5) at t=1, caption 1 none; pad (0) is ignored."""
    from rlrefine.losses import word_emphasis_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[4, 5, 0], [4, 6, 2]])
    ce = lambda b, t: -F.log_softmax(logits[b, t], -1)[targets[b, t]].item()  # noqa: E731
    got = word_emphasis_loss(logits, targets, torch.tensor([5, 3]), pad_id=0, word_weight=2.0, caption_weight=0.5)
    assert got.item() == pytest.approx(2.0 * ce(0, 1) + 0.5 * (ce(0, 0) + ce(0, 1)) / 2, rel=1e-6)
    none = word_emphasis_loss(logits, targets, torch.tensor([3]), pad_id=0, word_weight=2.0, caption_weight=0.5)
    assert none.item() == 0.0  # no chosen word in the batch: nothing added
    # the gradient reaches only the captions that hold a chosen word
    leaf = logits.clone().requires_grad_(True)
    word_emphasis_loss(leaf, targets, torch.tensor([5]), 0, 1.0, 1.0).backward()
    assert leaf.grad[1].abs().sum() == 0 and leaf.grad[0, 2].abs().sum() == 0 and leaf.grad[0, :2].abs().sum() > 0


def test_locate_loss_by_hand():
    """Mean squared distance over the positions that name an object; none named adds 0 and keeps the graph."""
    from rlrefine.losses import locate_loss

    pred = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, -1.0]]])
    targets = torch.tensor([[[0.5, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, False, True]])
    assert locate_loss(pred, targets, mask).item() == pytest.approx((0.25 + (1.0 + 4.0)) / 2)
    leaf = pred.clone().requires_grad_(True)
    none = locate_loss(leaf, targets, torch.zeros(1, 3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and leaf.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="mask"):
        locate_loss(pred, targets, mask[:, :2])
