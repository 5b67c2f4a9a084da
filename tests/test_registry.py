"""The one table of methods (tether/registry.py) and the one method contract (tether/trainers/method.py).

(a) every row resolves, and the CLI, the sweep, ``method_for`` and the certificate read the table;
(b) the exact tier of the certificate runs the shipped methods' own prepare/loss: on-policy, PPO (λ = 1,
    no whitening) and RLOO have exactly REINFORCE's expected gradient with the KL in the reward;
(c) adding an online method is its file, one row and its tests: a REINFORCE with a group-mean baseline,
    defined only here, registered with one ``register_method`` call, trains from ``tether <name>`` on
    stories260K, is swept by name and is certified by the exact tier (its expected gradient is
    (1 - 1/G) x REINFORCE's, G the group size: the baseline includes the sample itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from tether import cli, registry
from tether.ops.kl import seq_sum
from tether.ops.policy import aggregate_loss, masked_mean, reinforce_loss, token_rewards
from tether.registry import METHODS, MethodSpec, register_method
from tether.trainers.method import Counts, LossInputs, OnlineMethod, Prepared
from tether.trainers.online import OnlineConfig

# ---- a method defined only in this test: REINFORCE with a group-mean baseline -----------------------------


@dataclass
class GroupMeanConfig(OnlineConfig):
    """OnlineConfig plus the group size default; KL in the reward (k1)."""

    beta: float = 0.05
    samples_per_prompt: int = 2
    loss_aggregation: str = "seq_sum"

    method: ClassVar[str] = "reinforce_gm"


def gm_prepare(*, scores, kl_tokens, mask, values=None, cfg, beta) -> Prepared:
    """R_i = score_i - β Σ_t kl_t; A_i = R_i - mean of R over the sample's group of G (itself included)."""
    rewards = token_rewards(scores, kl_tokens, mask, beta=beta)  # (B, T)
    seq = seq_sum(rewards, mask)  # (B,)
    groups = seq.view(-1, cfg.samples_per_prompt)
    return Prepared((groups - groups.mean(-1, keepdim=True)).reshape(-1), rewards=rewards)


def gm_loss(x: LossInputs, *, cfg, beta, counts: Counts):
    """-A_i Σ_t log π_θ(y_t|s_t), the mean over sequences (on-policy REINFORCE; no ratio)."""
    per_token, _ = reinforce_loss(x.logps, x.advantages, x.mask)
    total = aggregate_loss(
        per_token, x.mask, mode=cfg.loss_aggregation, num_tokens=counts.tokens, num_seqs=counts.seqs, weights=x.weights
    )
    return total, {"policy_loss": masked_mean(per_token, x.mask).detach()}


GROUP_MEAN = OnlineMethod(name="reinforce_gm", prepare=gm_prepare, loss=gm_loss)

ROW = MethodSpec(
    "reinforce_gm",
    "online RL: REINFORCE with a group-mean baseline (test only)",
    config=GroupMeanConfig,
    train="tether.trainers.online:train_online",
    online=GROUP_MEAN,
)


@pytest.fixture
def registered():
    """The one row, for one test (removed afterwards)."""
    register_method(ROW)
    yield ROW
    METHODS.pop(ROW.name)


# ---- (a) the table -------------------------------------------------------------------------------------------


def test_every_row_resolves_and_names_its_config():
    assert list(METHODS) == ["sft", "rm", "dpo", "ppo", "grpo", "rloo", "bon"]
    for name, spec in METHODS.items():
        cls = spec.load("config")
        assert callable(spec.load("preflight"))
        if spec.train is not None:
            assert callable(spec.load("train"))
        if spec.is_online:
            assert cls.method == name and spec.load("online").name == name
    assert registry.online_names() == ("ppo", "grpo", "rloo")
    assert registry.sweep_names() == ("dpo", "ppo", "grpo", "rloo", "bon")


def test_cli_sweep_and_method_for_read_the_table(registered):
    from tether.sweep.spec import trainer_class
    from tether.trainers.online import method_for

    assert "reinforce_gm" in cli.commands() and "reinforce_gm" in cli.usage()
    assert trainer_class("reinforce_gm") is GroupMeanConfig
    assert method_for(GroupMeanConfig()) is GROUP_MEAN
    with pytest.raises(ValueError, match="choose one of dpo, ppo, grpo, rloo, bon, reinforce_gm"):
        trainer_class("nope")
    from tether.commands.certify import family

    assert family("reinforce_gm_k1") == "REINFORCE_GM" and family("ppo_k1") == "PPO"


# ---- (b) the exact tier runs the shipped prepare/loss ---------------------------------------------------------


def _expected_grad(algo: str, estimator: str, **kw) -> torch.Tensor:
    """E[∇ loss] of one on-policy update at a fixed policy away from π_ref (exact enumeration)."""
    from tether.oracle.certify import Suite
    from tether.oracle.certify_online import Context, OnlineSetup, collect, scores_of, update_loss
    from tether.oracle.tabular import TabularPolicy

    problem = Suite().problem
    torch.manual_seed(0)
    policy = TabularPolicy(problem.space, problem.ref.table.detach() + 0.3 * torch.randn_like(problem.ref.table))
    ctx = Context(problem, OnlineSetup(algo, estimator, "reward", **kw))
    logits, logps = scores_of(policy, ctx.full)
    ro = collect(ctx, policy, 0.5, logits_full=logits, logps_full=logps, generator=torch.Generator())
    (grad,) = torch.autograd.grad(
        update_loss(ctx, policy, ro, 0.5, logits_full=logits, logps_full=logps), [policy.table]
    )
    return grad


def _tol(g: torch.Tensor, terms: int = 1000) -> float:
    """float64 rounding of sums of ~``terms`` products of this magnitude (the enumerated rows x tokens)."""
    return torch.finfo(g.dtype).eps * float(g.abs().max()) * terms


@pytest.mark.parametrize("estimator", ["k1", "exact"])
def test_shipped_ppo_and_rloo_have_reinforce_expected_gradient(estimator):
    """On-policy the clipped ratio is 1, so PPO's surrogate differentiates as -A ∇log π with A the reward-to-go
    (GAE λ = 1, V = 0); RLOO's leave-one-out baseline and whole-sequence reward have the same expectation
    (causality). With exact in the reward both add β x its direct term, as REINFORCE does."""
    pg = _expected_grad("pg", estimator)
    assert float(pg.norm()) > 0.05
    for algo, kw in (("ppo", {}), ("rloo", {"group_size": 2})):
        g = _expected_grad(algo, estimator, **kw)
        assert torch.allclose(g, pg, rtol=0, atol=_tol(pg)), (algo, float((g - pg).abs().max()))


def test_a_registered_method_is_certified_by_the_exact_tier(registered):
    """The group-mean baseline includes the sample: E[(R_i - (R_i + R_j)/2) ∇log π(y_i)] = ½ E[R_i ∇log π(y_i)]
    for G = 2, i.e. half of REINFORCE's expected gradient."""
    pg = _expected_grad("pg", "k1")
    g = _expected_grad("reinforce_gm", "k1", group_size=2)
    assert torch.allclose(g, 0.5 * pg, rtol=0, atol=_tol(pg))


# ---- (c) a new method trains through the normal entry --------------------------------------------------------


def test_a_registered_method_trains_from_the_cli(registered, stories_path, tmp_path, capsys):
    """``tether reinforce_gm`` (the shared online command: parse, preflight, train_online) for two steps of 2
    prompts x 2 samples: the run logs the method's stats under its name, starts at KL 0 and moves the policy."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe little dog\nOne day, a girl\nTom was\n")
    out = tmp_path / "run"
    rc = cli.main(
        [
            "reinforce_gm",
            "--model",
            stories_path,
            "--prompts",
            str(prompts),
            "--reward",
            "reward_fns:length_reward",
            "--output_dir",
            str(out),
            "--batch_size",
            "4",
            "--max_new_tokens",
            "8",
            "--max_steps",
            "2",
            "--learning_rate",
            "1e-2",
            "--eval_every",
            "0",
            "--eval_max_prompts",
            "2",
            "--eval_samples",
            "1",
            "--sample_every",
            "0",
            "--progress",
            "false",
            "--report_to",
            "none",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["final"] == str(out / "final")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reinforce_gm/policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl/ref"] == 0.0 and steps[1]["kl/ref"] > 0.0  # π_θ = π_ref at the first rollout, then it moved
    assert not any(k.startswith(("ppo/", "grpo/", "rloo/")) for k in steps[0])


def test_a_registered_method_is_refused_by_its_config_checks(registered):
    """The shared online checks run for it too (one UserError naming the field)."""
    from tether.errors import UserError
    from tether.trainers.online import _validate

    with pytest.raises(UserError, match="kl_estimator"):
        _validate(GroupMeanConfig(kl_estimator="k9"), GROUP_MEAN)
