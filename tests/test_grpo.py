"""GRPO as a registered fine-tuning method (rlrefine/methods/grpo.py): its loss per layer from the shaped
rewards, the scalars it logs, several updates per generation through the real fine-tuning loop."""

import json
from pathlib import Path

import pytest
import torch

from rlrefine.config import FinetuneSection
from rlrefine.losses import group_advantages, grpo_loss
from rlrefine.methods import METHODS, LayerInputs

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


def _inputs(B=2, n=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = -torch.rand(B, n, T, generator=g)
    mask = torch.ones(B, n, T, dtype=torch.bool)
    mask[:, :, 3:] = False
    tok = tok.masked_fill(~mask, 0.0)
    shaped = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])  # the second group ties: no signal
    return LayerInputs(logps=tok.sum(-1), ref_logps=tok.sum(-1) - 0.1, rewards=shaped + 0.5, shaped=shaped,
                       lengths=mask.sum(-1).float(), token_logps=tok.requires_grad_(), ref_token_logps=tok.detach() - 0.05,
                       mask=mask, entropy=torch.full((B, n, T), 0.7))


def test_grpo_layer_loss_is_grpo_loss_on_group_advantages_of_the_shaped_rewards():
    f = FinetuneSection(method="grpo", num_candidates=4, grpo={"beta": 0.04, "loss_type": "dapo"})
    method = METHODS["grpo"](f.grpo, f)
    x = _inputs()
    loss, m = method.layer_loss(x)
    adv = group_advantages(x.shaped.reshape(-1), 4, "group")
    expected, _ = grpo_loss(x.token_logps.reshape(8, 5), x.token_logps.detach().reshape(8, 5),
                            x.ref_token_logps.reshape(8, 5), adv, x.mask.reshape(8, 5), beta=0.04, epsilon=0.2,
                            loss_type="dapo")
    torch.testing.assert_close(loss, expected)
    assert adv[4:].abs().max() == 0  # a tied group has zero advantage
    assert m["grpo/tied_groups"] == 0.5 and m["grpo/completion_tokens"] == 3.0 and m["grpo/entropy"] == pytest.approx(0.7)
    assert {"grpo/kl", "grpo/clip_ratio/high_mean", "grpo/clip_ratio/low_mean", "grpo/clip_ratio/region_mean"} <= set(m)
    loss.backward()  # one update per generation: the ratio is 1 and the gradient is −A·∇log π, per token
    assert x.token_logps.grad[1].abs().max() < 0.04 * 1.01  # the tied group moves only through the KL term


def test_grpo_config_rejects_unknown_keys_and_values():
    from rlrefine.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="finetune.grpo.loss_type"):
        load_recipe(None, ["finetune.method=grpo", "finetune.grpo.loss_type=bnpo"])
    with pytest.raises(RecipeError, match="finetune.grpo.clip"):
        load_recipe(None, ["finetune.grpo.clip=0.2"])


def test_several_updates_per_generation_through_the_loop(tmp_path):
    """num_iterations 2: two optimizer steps share one rollout, the second one with π ≠ π_old (ratios move)."""
    from tests_tiny_model import tiny_captioner  # noqa: PLC0415  (tests/ helper)
    from rlrefine.config import load_recipe
    from rlrefine.trainers.finetune import finetune

    model = tiny_captioner(tmp_path / "xe")
    data = ["data.shapes.num_train=64", "data.shapes.num_val=8", "data.shapes.num_test=8", "data.shapes.num_test_novel=8"]
    base = [f"run_dir={tmp_path}", "threads=1", *data, f"finetune.init={model}", "finetune.method=grpo", "finetune.steps=4",
            "finetune.batch_size=2", "finetune.num_candidates=3", "finetune.max_len=8", "finetune.warmup_steps=1",
            "finetune.log_every=1", "finetune.lr=1e-2", "finetune.reward={kind: grammar}", "finetune.grpo.num_iterations=2"]
    with pytest.raises(ValueError, match="checkpoint_every .* multiple of the grpo updates per generation"):
        finetune(load_recipe(RECIPE, [*base, "finetune.checkpoint_every=3", "finetune.output=odd"]))
    rollouts = []
    finetune(load_recipe(RECIPE, [*base, "finetune.checkpoint_every=2"]),
             on_step_end=lambda step, rollout, **_: rollouts.append(rollout))
    assert rollouts[0] is rollouts[1] and rollouts[2] is rollouts[3] and rollouts[1] is not rollouts[2]
    report = json.loads((tmp_path / "finetune" / "report.json").read_text())
    assert report["method"] == "grpo" and report["steps"] == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (tmp_path / "finetune").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"layer_2/grpo/tied_groups", "layer_2/grpo/entropy", "layer_2/grpo/kl", "layer_2/grpo/clip_ratio/region_mean",
            "layer_2/reward_std", "layer_2/shaped_reward_std", "layer_1/grpo/completion_tokens"} <= tags
