"""The certificate can fail: break each shipped trainer where users' runs would break, and the rows
it trains must turn red. Each mutation patches a name the trainer module itself calls (so the patched
code is what ``train_online`` / ``train_dpo`` run), then runs the certificate rows of that trainer.

Mutations: flip the KL's sign, drop the KL term, drop PPO's clip (the trust-region row), drop DPO's
reference. Each runs one or two rows (~10-30 s each on 2 cores), so the module is marked slow.
"""

from __future__ import annotations

import pytest

from tether import reference as reference_mod
from tether.oracle import certify
from tether.trainers import dpo as dpo_mod
from tether.trainers import grpo as grpo_mod
from tether.trainers import ppo as ppo_mod
from tether.trainers import rloo as rloo_mod

pytestmark = pytest.mark.slow


def _rows(names):
    return {c.name: c for c in certify.run_certification(names, jobs=1)}


def _scaled_beta(fn, factor):
    """``fn`` (token_rewards or kl_loss_term's caller) with β multiplied by ``factor``."""
    def patched(*args, beta, **kwargs):
        return fn(*args, beta=beta * factor, **kwargs)
    return patched


@pytest.mark.parametrize("factor", [-1.0, 0.0], ids=["kl_sign_flipped", "kl_dropped"])
def test_ppo_and_rloo_rows_fail_when_the_kl_in_the_reward_is_broken(monkeypatch, factor):
    monkeypatch.setattr(ppo_mod, "token_rewards", _scaled_beta(ppo_mod.token_rewards, factor))
    monkeypatch.setattr(rloo_mod, "token_rewards", _scaled_beta(rloo_mod.token_rewards, factor))
    got = _rows(["ppo_k1", "rloo_k1"])
    assert not got["ppo_k1"].ok and not got["rloo_k1"].ok, {k: (c.kl_to_target, c.note) for k, c in got.items()}
    # far off, not just over the bar: a flipped sign diverges (> 1 nat), a dropped KL heads for the reward maximiser
    assert got["ppo_k1"].kl_to_target > (100 * certify.SAMPLED_TOL if factor < 0 else 5 * certify.SAMPLED_TOL)


@pytest.mark.parametrize("factor", [-1.0, 0.0], ids=["kl_sign_flipped", "kl_dropped"])
def test_grpo_row_fails_when_the_kl_in_the_loss_is_broken(monkeypatch, factor):
    original = grpo_mod.kl_loss_term

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)  # KLTokens (a NamedTuple)
        return out._replace(per_token=out.per_token * factor)

    monkeypatch.setattr(grpo_mod, "kl_loss_term", patched)
    (cert,) = certify.run_certification(["grpo_k3"], jobs=1)
    assert not cert.ok, (cert.kl_to_target, cert.note)


def test_ppo_trust_region_row_fails_without_the_clip(monkeypatch):
    original = ppo_mod.ppo_policy_loss
    monkeypatch.setattr(ppo_mod, "ppo_policy_loss", lambda *a, clip, **k: original(*a, clip=1e9, **k))
    (cert,) = certify.run_certification(["ppo_clip_trust_region"], jobs=1)
    assert not cert.ok and cert.kl_to_target > 2 * certify.TRUST_REGION, (cert.kl_to_target, cert.note)


def test_dpo_row_fails_without_its_reference(monkeypatch):
    original = dpo_mod.preference_loss

    def no_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *args, **kwargs):
        return original(policy_chosen, policy_rejected, ref_chosen * 0, ref_rejected * 0, *args, **kwargs)

    monkeypatch.setattr(dpo_mod, "preference_loss", no_reference)
    (cert,) = certify.run_certification(["dpo"], jobs=1)
    assert not cert.ok, (cert.kl_to_target, cert.note)


def test_moving_reference_rows_fail_when_the_reference_stays_fixed(monkeypatch):
    """No reset / no lag (on_step does nothing): both runs converge to π*(β) and both rows turn red."""
    monkeypatch.setattr(reference_mod.SyncedReference, "on_step", lambda self, policy, step: False)
    monkeypatch.setattr(reference_mod.LaggedReference, "on_step", lambda self, policy, step: False)
    got = _rows(["ppo_ref_reset", "ppo_ref_lag"])
    assert not got["ppo_ref_reset"].ok and not got["ppo_ref_lag"].ok, {k: (c.kl_to_target, c.note) for k, c in got.items()}
