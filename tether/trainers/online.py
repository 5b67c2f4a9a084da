"""Online RL from a reward: the one rollout-and-update loop that PPO, GRPO and RLOO share.

A method (``OnlineMethod``, the contract in ``method.py``: PPO in ``ppo.py``, GRPO in ``grpo.py``, RLOO in
``rloo.py``, each a row of ``tether.registry``) supplies only what differs between them — how a rollout becomes
advantages (``prepare``) and the per-token loss of a micro-batch (``loss``); everything else is this file (the rollout
itself is ``rollout.py``), read top to bottom in ``train_online``:

    for step in range(max_steps):
        prompts  = this step's prompts (a pure function of (seed, step)), each repeated G times
        rollout  = sample with a KV cache (stop at EOS; tokens after it are masked out)
                   -> scores from the reward (optional no-EOS penalty)
                   -> old_logps (policy), ref_logps (reference), per-token KL (kl_estimator),
                      exact per-token KL (for kl/ref), entropy, values (PPO)
                   (with one update per rollout, scores_from_update: no scoring pass of the policy; the
                   update's own forward fills these, after a reference forward per micro-batch)
        method.prepare(rollout, β)            rewards / advantages / returns
        for epoch, minibatch, micro-batch:    method.loss(...).backward(); all-reduce; clip; step
        β controller.update(kl/ref)           log, log samples, evaluate, checkpoint

KL conventions (docs/theory.md §2–3): every KL is KL[π^{τ,F}_θ‖π^τ_ref], between the policy as sampled
(logits divided by the sampling temperature τ and restricted to the token sets F_t the sampler's
top-k/top-p allowed, stored in ``batch.allowed``) and the fixed reference process (its logits divided by
the same τ, whole vocabulary), both models in eval mode (no dropout: the online methods keep the policy
in eval mode throughout, so π_θ/π_old = 1 before the first update; TRL #506). ``kl/ref`` is the mean
*sequence-sum* KL measured with the exact (Rao-Blackwellised) estimator on the rollout, whatever
estimator the method puts in its reward or loss (unbiased, and the lowest variance per token; a
sequence sum of k1 can vary less, docs/theory.md §2); it is also what every β controller is fed. It is
0 at step 0 without top-k/top-p; with them it starts at ``kl/filter_cost`` = E Σ_t -log π^τ_ref(F_t),
the filter's own cost, logged every step. ``kl/penalty`` is β·(mean sequence sum of the configured
estimator), the KL as applied (to the restricted reference with ``kl_reference_filter: restricted``). The
loss differentiates the same π^{τ,F}_θ with the stored F_t, always finite since the sampled token is in
F_t (``groups.sampling_settings``).

Sizes (checked once, ``derive_sizes``): ``batch_size`` completions per step = prompts x
``samples_per_prompt``; prompts are split over processes (a GRPO/RLOO group never straddles two);
each process's rollout is cut into ``num_minibatches`` optimiser updates per epoch, each
accumulated over ``grad_accum`` micro-batches. A "step" (``max_steps``) is one rollout plus its
``num_epochs x num_minibatches`` updates. Losses are divided by *global* token / sequence counts, so
N processes == 1 process for a given rollout (distributed.py); each process samples its own shard
with its own generator, so the samples themselves depend on the number of processes. Deviations,
documented where they happen: advantage whitening (PPO) and reward normalisation use per-process
statistics, as TRL does; evaluation runs the same prompts on every process (identical results).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from .. import rng
from ..callbacks import Callbacks
from ..config import config_group
from ..control import BetaConfig, build_controller
from ..data.prompts import Prompt, as_prompts, eval_prompts_split, hold_out_prompts, load_prompts, prompt_texts
from ..data.text import batch_indices
from ..diagnostics.hacking import HackingMonitor
from ..distributed import Dist
from ..engine import evaluate as evaluate_kl
from ..engine import mean_stderr, score_rows, score_rows_from_head
from ..errors import UserError
from ..fsdp import is_sharded, models_of, shard_reference, unsharded
from ..generation import backend_for
from ..groups import DATA_FIELDS, ReferenceConfig, SamplingConfig, SamplingSettings, sampling_settings
from ..inputs import accepts_objects, datasets_as_rows
from ..measure import encode_prompts, prompt_ids
from ..modeling import (
    CompletionBatch,
    completion_hidden,
    forward_completion,
    head_unsupported_reason,
    lm_head,
    vocab_size,
)
from ..ops.head import head_scores
from ..ops.kl import check_estimator, check_reference_filter
from ..ops.logprobs import selective_logps
from ..ops.policy import AGGREGATION_MODES
from ..ops.positions import check_position_weights
from ..ops.reward_model import nan_mean_std, weighted_reward_sum
from ..preempt import preemptible, stop_if_signalled
from ..reference import check_lora_reference, check_reference_form, reference_from_config
from ..rewards import (
    CallableSource,
    RewardSet,
    RewardSource,
    WeightedRewards,
    build_reward,
    call_source,
    checked_scores,
    combine_rewards,
    reward_columns,
    reward_specs,
)
from ..runs import History, RunDir, save_final
from ..shared_prompt import shared_prompt_mode, supports_shared_prompt
from ..training import (
    Checkpointer,
    StepGuard,
    TrainConfig,
    clip_and_norm,
    load_policy,
    make_optimizer,
    make_scheduler,
    postfix,
    progress_bar,
    step_schedule,
    trainable_params,
    with_epochs,
)
from ..value import build_value_model
from .method import Counts, LossInputs, OnlineMethod, Prepared, beta_weights, exact_kl_direct_term  # noqa: F401 (re-exported)
from .mismatch import add_mismatch_stats, check_correction
from .result import TrainResult
from .rollout import Rollout, collect_rollout, fill_scores, reward_component_stats, rollout_stats

log = logging.getLogger(__name__)

ONLINE_REFERENCE_FORMS = ("copy", "lora", "offload")


@config_group("reference", prefixes=("reference", "ref"))
@dataclass
class OnlineReferenceConfig(ReferenceConfig):
    """The online trainers' reference group: the shared one plus a moving reference (docs/theory.md §14)."""

    ref_reset_every: int = 0
    """Hard-reset the reference to the current policy every N steps (ProRL, arXiv:2505.24864; 0 = never): the KL then
    anchors to the new reference."""
    ref_reset_optimizer: bool = False
    """With ref_reset_every: also clear the optimiser state (Adam moments) at each reset, as ProRL does."""
    ref_lag: int = 0
    """Rolling reference: score step t's rollout against the policy of step t-N (0 = off; snapshots of the trainable
    tensors kept in CPU memory)."""
    reference_prompt: Optional[str] = None
    """Score the reference on a transformed prompt g(x) while the policy sees x (the reference-shift remedy,
    docs/theory.md §13): strip_prefix:TEXT, file.py:function or module:function (str -> str). Every KL (penalty,
    loss, kl/ref, eval/kl) is then KL[π_θ(·|x)‖π_ref(·|g(x))]."""


@config_group("data", prefixes=("dataset",), fields=DATA_FIELDS)
@dataclass
class OnlineConfig(TrainConfig, BetaConfig, SamplingConfig, OnlineReferenceConfig):
    """Fields shared by ``tether ppo``, ``grpo`` and ``rloo`` (plus the groups: TrainConfig's training
    and lora, BetaConfig's beta, SamplingConfig's sampling, ReferenceConfig's reference)."""

    prompts: str = ""
    """Training prompts: a text file (one per line), .jsonl/.json/.parquet with a 'prompt' column (a string or a list
    of {role, content} messages; other columns reach reward functions), a saved datasets folder or a hub name."""
    prompt_field: str = "prompt"
    """Column holding the prompt in table rows."""
    columns: Optional[dict] = None
    """Rename prompt-data columns first: a YAML map {question: prompt, answer: ground_truth} or
    'question=prompt,answer=ground_truth'."""
    chat_template: Optional[str] = None
    """Jinja chat template (string or file) for conversational prompts when the tokenizer has none."""
    reward: Any = "vader"
    """Reward to optimise: 'vader', a reward-model folder (tether rm's final/), 'file.py:function', 'module:function'
    or TRL's 'module.function' (NAME=spec renames its metric); or several, as a YAML list or comma-separated
    (fmt.py:f,acc.py:g), whose weighted sum is optimised (TRL's reward_funcs)."""
    reward_weights: Optional[list] = None
    """One weight per entry of reward (the optimised score is Σ w_k·r_k; a function's None leaves its term out);
    None = every weight 1.0."""
    log_rewards: list = field(default_factory=list)
    """Extra rewards to log but not optimise (gold vs proxy), e.g. gold=vader,other=mod:fn -> reward/<name>."""
    reward_normalize: bool = False
    """Standardise the optimised score with its running mean/std (state is checkpointed; per process)."""
    reward_clip: Optional[float] = None
    """Clamp the optimised score to [-c, c] (after normalisation)."""
    no_eos_penalty: Optional[float] = None
    """Subtract this from the score of every completion that hit max_new_tokens without EOS (None = off)."""
    samples_per_prompt: int = 1
    """Completions sampled per prompt (the group size G of GRPO/RLOO); batch_size must divide by it."""
    max_prompt_length: Optional[int] = None
    """Error on prompts longer than this many tokens (None = no limit)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator k1 | k2 | k3 | exact (docs/theory.md §2-3; tether.ops.kl.ESTIMATORS lists value and
    gradient bias per placement)."""
    kl_reference_filter: str = "none"
    """The reference of the KL penalty under top-k/top-p (docs/theory.md §3): none = the fixed reference π^τ_ref
    (tempered, unfiltered; the default); restricted = π^τ_ref restricted to the policy's own sampled sets and
    renormalised (a reference that moves with the policy: drops the filter cost from the penalty, e.g. 0 instead of
    3.22 nats at top_k=2 for a policy that has left the reference's top token). kl/ref always measures the fixed
    reference."""
    kl_clamp_input: Optional[float] = None
    """Clamp the log-ratio lr = log π_θ - log π_ref to [-c, c] before the k1/k2/k3 estimator (None = off; verl uses
    20 for k3). Clamped tokens get no KL gradient: kl/clamped_frac logs their fraction."""
    kl_clamp_output: Optional[float] = None
    """Clamp the per-token KL value to [-c, c] (None = off; verl uses 10 for k3, OpenRLHF 10). Applies to the
    rollout's kl_tokens and the loss-side KL; kl/ref (exact) is never clamped."""
    behaviour_correction: str = "none"
    """Correct for a sampler whose distribution μ differs from the trainer's π_old (a fast inference engine, another
    precision or kernel; docs/theory.md §3): none | token_tis (weight min(π_old/μ, C) per token; Yao et al. 2025) |
    seq_tis (min(Π_t π_old/μ, C) per sequence) | token_mis, seq_mis (weight π_old/μ, token or sequence dropped when
    it leaves [1/C, C]; Liu et al. 2025). The weight multiplies the policy-gradient term and a loss-side KL;
    tether.ops.behaviour.CORRECTIONS states each one's bias. mismatch/* is logged whatever is chosen."""
    behaviour_cap: float = 2.0
    """C of behaviour_correction (> 1): the truncation cap of *_tis, the band [1/C, C] of *_mis."""
    beta_position_decay: float = 0.0
    """Position-dependent β (Qi et al. 2024, arXiv:2406.05946): the KL of completion token t is weighted by w_t =
    exp(-decay·t), so the penalty is Σ_t β·w_t·KL_t (0 = off, w ≡ 1). Changes the objective (docs/theory.md §12)."""
    beta_position_weights: Optional[list] = None
    """Explicit w_t instead: w_t = weights[t], the last one repeated for later tokens, e.g. 4,2,1 (None = off)."""
    num_epochs: int = 1
    """Passes over each rollout (PPO epochs; GRPO's μ). Epochs after the first are off-policy (ratio ≠ 1)."""
    num_minibatches: int = 1
    """Optimiser updates per epoch; each process's rollout must divide into them (and each into grad_accum
    micro-batches)."""
    score_from_update: bool = True
    """With one update per rollout (num_epochs = num_minibatches = 1), take π_old's log-probs, the KLs and the
    entropy from the update's own forward instead of a separate scoring pass of the policy (exact: the weights are
    π_old's until the step; TRL does the same). GRPO always; RLOO only with one micro-batch per rollout
    (grad_accum=1, its KL is in the reward); PPO never (its value model scores the rollout); false keeps the pass.
    Memory: on the logits path the reference's logits of a micro-batch (micro x length x vocabulary floats) are then
    alive next to the training graph; with chunked_head (the default from a 32K vocabulary) no logits are held."""
    chunked_head: str = "auto"
    """Score the update from the final hidden states with the LM head applied a chunk of positions at a time
    (``tether.ops.head.head_scores``), so no (micro x length x vocabulary) logits of the policy or the reference are
    ever held: log-probs, the reference's, the exact KL, entropy and filter cost come out per token, the backward
    recomputes each chunk's logits (docs/speed.md, "Memory at real vocabularies"): auto (on for a vocabulary of
    at least 32,768 tokens, where the logits dominate the update's memory) | true | false. The numbers equal the
    logits path's to float32 rounding. Where the model cannot take it (an architecture other than Llama, GPT-2,
    Qwen2; autocast; a LoRA-adapted LM head; fsdp; a reference form without a decoder to call, e.g. an offloaded
    one that moves between devices) the logits path is used (logged)."""
    shared_prompt: str = "auto"
    """Score each group (the samples_per_prompt completions of one prompt) as one row, [prompt, completion_1, ...,
    completion_G] under a prefix-tree attention mask, so the trunk computes the prompt once instead of G times, in the
    update's forward, the reference's and the scoring pass (docs/speed.md): auto (where the model supports it — Llama,
    GPT-2, Qwen2 with sdpa or eager attention — and it saves arithmetic: long prompts, G > 1) | true | false. The
    numbers equal the padded layout's to float32 rounding; an unsupported model keeps the padded layout (logged)."""
    clip_eps: float = 0.2
    """ε of the clipped surrogate min(ρA, clip(ρ, 1-ε, 1+ε)A) (PPO Eq. 7)."""
    loss_aggregation: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_sum: how per-token losses become a scalar
    (tether.ops.policy.aggregate_loss)."""
    target_kl_old: Optional[float] = None
    """Stop this step's remaining updates once the k3 KL to the behaviour policy (<method>/approx_kl_old, e.g.
    ppo/approx_kl_old) exceeds this (None = off)."""
    eval_prompts: Optional[str] = None
    """Held-out prompts for eval/* (same formats); default: the test/validation split of a saved DatasetDict given as
    prompts, else a seeded 10% of the prompts file (at most eval_max_prompts; none under 10 prompts), held out of
    training. Prompts given in memory (Python) are evaluated on eval_prompts, else on the first training prompts."""
    eval_max_prompts: int = 64
    """At most this many eval prompts are used."""
    eval_samples: int = 2
    """Completions per eval prompt for eval/kl (exact estimator) and eval/reward/<name>."""
    sample_every: int = 10
    """Append num_logged_samples rollout samples to samples.jsonl every N steps (0 = never)."""
    num_logged_samples: int = 4
    """Samples written each time."""

    method: ClassVar[str] = "online"


# --------------------------------------------------------------------------------------------------
# Sizes, data order, seeds


@dataclass(frozen=True)
class Sizes:
    prompts_per_process: int  # distinct prompts per process per step
    rollout: int  # completions per process per step
    minibatch: int  # completions per process per optimiser update
    micro: int  # completions per forward/backward


def derive_sizes(cfg: OnlineConfig, dist: Dist) -> Sizes:
    """All batch sizes, derived once with exact divisibility."""
    G = cfg.samples_per_prompt
    if G < 1:
        raise UserError(f"samples_per_prompt must be >= 1, got {G}")
    if cfg.batch_size % G:
        raise UserError(
            f"batch_size={cfg.batch_size} must be divisible by samples_per_prompt={G} (batch_size counts completions)"
        )
    n_prompts = cfg.batch_size // G
    if n_prompts % dist.world_size:
        raise UserError(
            f"prompts per step (batch_size / samples_per_prompt = {n_prompts}) must divide over {dist.world_size} "
            "processes"
        )
    rollout = cfg.batch_size // dist.world_size
    if rollout % cfg.num_minibatches:
        raise UserError(
            f"each process's rollout ({rollout} completions) must divide into num_minibatches={cfg.num_minibatches}"
        )
    mb = rollout // cfg.num_minibatches
    if mb % cfg.grad_accum:
        raise UserError(
            f"each minibatch ({mb} completions per process) must divide into grad_accum={cfg.grad_accum} micro-batches"
        )
    return Sizes(n_prompts // dist.world_size, rollout, mb, mb // cfg.grad_accum)


def seeded(*keys: int, device=None) -> torch.Generator:
    """A generator on ``device`` (default the CPU) seeded from integers (seed, step, ...): sampling and
    minibatch order are pure functions of them, so a resumed run draws exactly what the uninterrupted
    one would have (``tether.rng``: on the CPU, the same draws as ever)."""
    return rng.generator(rng.mix(*keys), device)


# --------------------------------------------------------------------------------------------------
# Methods


@dataclass
class PolicyOutput:
    """The policy's forward pass over a micro-batch, with gradients."""

    logits: Optional[torch.Tensor]  # (B, T, V) of the sampled distribution (temperature, stored filter set); None
    # under the chunked head, whose per-token scores are in ``scores``
    logps: torch.Tensor  # (B, T) fp32, 0 off-mask
    values: Optional[torch.Tensor] = None  # (B, T) (PPO)
    scores: Optional[dict] = None  # ops.head.head_scores' (B, T) outputs (chunked_head): logps, entropy and, with a
    # reference, ref_logps, kl_exact (with its gradient), filter_cost


CHUNKED_HEAD_VOCAB = 32768
"""chunked_head auto: on from this vocabulary size. Below it the (micro, length, vocabulary) logits are small next to
the model (stories260K's 512 tokens: kilobytes) and the chunked backward's recomputed head products only cost time;
from 32K (Llama-2 and -3's 32,000/128,256, Qwen2's 151,936 are the vocabularies in use) the logits are the
update's largest tensors (docs/speed.md, "Memory at real vocabularies")."""


def chunked_head_mode(value) -> str:
    """The config's ``chunked_head`` (auto | true | false, or on | off) as auto | on | off."""
    try:
        return shared_prompt_mode(value)
    except UserError:
        raise UserError(f"chunked_head must be auto, true or false, got {value!r}; set --chunked_head") from None


def use_chunked_head(cfg, policy, reference, *, needs_reference: bool) -> bool:
    """Whether the update scores through ``ops.head.head_scores`` (``OnlineConfig.chunked_head``): the mode, the
    vocabulary (auto), and whether the policy (and, when the update reads it, the reference) can be scored from
    hidden states and a plain LM head; logs why not when it was asked for or auto would take it."""
    mode = chunked_head_mode(cfg.chunked_head)
    if mode == "off" or (mode == "auto" and vocab_size(policy) < CHUNKED_HEAD_VOCAB):
        return False
    why = head_unsupported_reason(policy)
    if why is None and is_sharded(policy):
        why = "the policy is sharded (fsdp)"
    if why is None and needs_reference:
        ref_model = reference.head_model()
        why = (
            f"the {reference.kind!r} reference gives logits only"
            if ref_model is None
            else head_unsupported_reason(ref_model)
        )
    if why is not None:
        log.info("chunked_head: using the logits path: %s", why)
        return False
    return True


def policy_output(
    policy, value_model, batch: CompletionBatch, *, filters: SamplingSettings, head: bool = False, ref=None
) -> PolicyOutput:
    """The policy's forward over ``batch``: (B, T, V) logits, or with ``head`` (chunked_head) the decoder's
    hidden states scored by ``ops.head.head_scores``, with the reference's scores in the same pass when
    ``ref`` = (hidden (B, T, D'), weight, bias) (``Reference.hidden``) is given."""
    want_hidden = value_model is not None and value_model.needs_policy_hidden
    if head:
        f = sampling_settings(filters)
        hidden = completion_hidden(policy, batch)  # (B, T, D)
        weight, bias = lm_head(policy)
        rh, rw, rb = ref if ref is not None else (None, None, None)
        sc = head_scores(
            hidden,
            weight,
            batch.completion_ids,
            bias=bias,
            ref_hidden=None if rh is None else rh.to(hidden.device),
            ref_weight=rw,
            ref_bias=rb,
            temperature=f.temperature,
            allowed=batch.allowed if f.uses_token_filter else None,
        )
        logps = sc["logps"].masked_fill(~batch.mask, 0.0)
        policy_hidden = hidden if want_hidden else None
        values = value_model.values(batch, policy_hidden=policy_hidden) if value_model is not None else None
        return PolicyOutput(None, logps, values, scores=sc)
    logits, hidden = forward_completion(policy, batch, filters=filters, hidden=want_hidden)
    logps = selective_logps(logits, batch.completion_ids).masked_fill(~batch.mask, 0.0)
    values = value_model.values(batch, policy_hidden=hidden) if value_model is not None else None
    return PolicyOutput(logits, logps, values)


def loss_inputs(out: PolicyOutput, ro: Rollout, prep: Prepared, ref_logits: Optional[torch.Tensor]) -> LossInputs:
    """The method's view of one micro-batch (``ro``, ``prep`` and ``ref_logits`` are its rows)."""
    return LossInputs(
        kl_exact=out.scores.get("kl_exact") if out.scores is not None else None,
        logps=out.logps,
        old_logps=ro.old_logps,
        ref_logps=ro.ref_logps,
        mask=ro.mask,
        advantages=prep.advantages,
        adv_scale=prep.adv_scale,
        logits=out.logits,
        ref_logits=ref_logits,
        values=out.values,
        old_values=ro.values,
        returns=prep.returns,
        behaviour_logps=ro.behaviour_logps,
    )


def rollout_ref_logits(reference, ro: Rollout, *, chunk: int, filters: SamplingSettings) -> torch.Tensor:
    """(B, T, V) reference logits of the whole rollout, fetched once (``chunk`` rows per forward) for a
    method whose loss needs full reference distributions."""
    parts = [
        reference.logits(ro.batch.select(slice(s, s + chunk)), filters=filters)
        for s in range(0, ro.mask.shape[0], chunk)
    ]
    return torch.cat(parts).to(ro.mask.device)


def rollout_ref_hidden(reference, ro: Rollout, *, chunk: int) -> tuple:
    """``rollout_ref_logits`` under the chunked head: the reference's (B, T, D) final hidden states of the whole
    rollout (``chunk`` rows per forward) and its head (weight, bias): D floats per token instead of V."""
    parts, weight, bias = [], None, None
    for s in range(0, ro.mask.shape[0], chunk):
        h, weight, bias = reference.hidden(ro.batch.select(slice(s, s + chunk)))
        parts.append(h)
    return torch.cat(parts).to(ro.mask.device), weight, bias


def scores_from_update(cfg: OnlineConfig, method: OnlineMethod, sizes: Sizes, value_model) -> bool:
    """True when the update's own forward replaces the rollout's scoring pass of the policy, exactly.

    With one update per rollout (num_epochs = num_minibatches = 1) every micro-batch's forward runs on
    the behaviour policy's weights (the only optimiser step comes after all of them), in the same mode
    (eval, or train with every dropout at 0 under gradient checkpointing) and with the same sampling
    filters, so its detached log-probs *are* log π_old: the ratio is exactly 1, as TRL takes it when
    num_iterations = 1, and the KL and entropy are those the scoring pass computes (``engine.score_rows``
    on both paths; float rounding of the batch shape apart). The reference is then scored micro-batch by
    micro-batch inside the update, so a step runs one policy forward fewer. A method whose advantages
    read the scores (RLOO, PPO: the KL in the reward) needs all of them before its loss, which the update
    has only when the rollout is one micro-batch; a value model keeps the pass."""
    return (
        cfg.score_from_update
        and cfg.num_epochs == 1
        and cfg.num_minibatches == 1
        and value_model is None
        and (not method.prepare_reads_scores(cfg) or sizes.micro == sizes.rollout)
    )


def optimise(
    policy,
    value_model,
    opt,
    params: list,
    value_params: list,
    ro: Rollout,
    prep: Prepared,
    method: OnlineMethod,
    *,
    cfg,
    beta: float,
    sizes: Sizes,
    dist: Dist,
    ref_logits: Optional[torch.Tensor],
    step: int,
    aux=None,
    guard: Optional[StepGuard] = None,
    reference=None,
    chunked: bool = False,
    ref_hidden: Optional[tuple] = None,
) -> tuple[dict, dict, list, Prepared]:
    """``num_epochs`` passes of ``num_minibatches`` optimiser updates over the rollout.
    Returns (stat sums, stat counts, policy grad norms, prep); stops early past ``target_kl_old``.

    A ``pending`` rollout (``scores_from_update``) is scored here: each micro-batch's reference forward,
    then its policy forward, whose detached output fills the rollout (``rollout.fill_scores``) before the
    loss reads it; ``prep`` None means the advantages read those scores and are prepared then (the
    rollout is one micro-batch).

    Policy and value parameters are clipped separately: with one joint clip a large value loss
    (returns of a few nats once β·KL grows) would shrink the policy's step, and Adam's second-moment
    memory would keep it small for hundreds of updates.

    ``chunked`` (``use_chunked_head``): every forward scores through ``ops.head.head_scores`` from hidden states,
    the reference's (``Reference.hidden``; ``ref_hidden`` = the whole rollout's, ``rollout_ref_hidden``, in
    place of ``ref_logits``) in the same chunked pass, so no (micro, T, V) logits are held."""
    filters = sampling_settings(cfg)  # the loss differentiates the sampled π^{τ,F}_θ itself (stored F_t: always finite)
    # a batch sampled with top-k/top-p but without stored sets (not the built-in sampler's) recomputes F_t from logits
    head = chunked and (not filters.uses_token_filter or ro.batch.allowed is not None)
    sums: dict = {}
    counts: dict = {}
    norms: list = []
    B = ro.mask.shape[0]
    for epoch in range(cfg.num_epochs):
        g = seeded(cfg.seed, step, epoch, dist.rank, 2, device=ro.mask.device)
        perm = torch.randperm(B, generator=g, device=g.device)  # (B,) on the rollout's device
        for m in range(cfg.num_minibatches):
            rows = perm[m * sizes.minibatch : (m + 1) * sizes.minibatch]
            if ro.batch.shared_prompt != "off":  # groups together in the micro-batches, so they share their prompt
                rows = rows.sort().values  # (the minibatch is the same set: the gradient sums the same rows)
            mb, mb_prep = ro.select(rows), prep.select(rows) if prep is not None else None
            mb_ref = ref_logits[rows] if ref_logits is not None else None
            mb_ref_h = ref_hidden[0][rows] if ref_hidden is not None else None
            n = Counts(tokens=dist.sum_float(mb.mask.sum()), seqs=dist.sum_float(mb.mask.shape[0]))
            kl_old = [0.0, 0.0]
            loss_sum = 0.0  # this process's: a non-finite one skips the update (StepGuard)
            for j in range(0, sizes.minibatch, sizes.micro):
                part = slice(j, j + sizes.micro)
                micro = mb.select(part)
                micro_ref = mb_ref[part] if mb_ref is not None else None
                kw = dict(estimators=(cfg.kl_estimator,), clamp_input=cfg.kl_clamp_input)
                kw.update(clamp_output=cfg.kl_clamp_output, reference_filter=cfg.kl_reference_filter)
                if ro.pending and head:  # the reference's hidden states, then one chunked pass scores both models
                    with torch.no_grad():
                        ref = reference.hidden(micro.batch)  # ((b, T, D'), weight, bias) of π_ref
                    out = policy_output(policy, value_model, micro.batch, filters=filters, head=True, ref=ref)
                    fill_scores(ro, rows[part], score_rows_from_head(out.scores, micro.batch, **kw), cfg=cfg)
                elif ro.pending:  # score here: reference, then the policy forward that also takes the gradient
                    with torch.no_grad():
                        micro_ref = reference.logits(micro.batch, filters=filters)  # (b, T, V) π^τ_ref
                    out = policy_output(policy, value_model, micro.batch, filters=filters)
                    micro_ref = micro_ref.to(out.logits.device)
                    fill_scores(ro, rows[part], score_rows(out.logits.detach(), micro_ref, micro.batch, **kw), cfg=cfg)
                if ro.pending:
                    micro = ro.select(rows[part])
                    if mb_prep is None:  # advantages read the scores: the rollout is this one micro-batch
                        prep = method.prepare(
                            scores=ro.scores, kl_tokens=ro.kl_tokens, mask=ro.mask, values=None, cfg=cfg, beta=beta
                        )
                        mb_prep = prep.select(rows)
                    if not method.needs_ref_logits(cfg):
                        micro_ref = None
                elif head:
                    ref = (mb_ref_h[part], *ref_hidden[1:]) if mb_ref_h is not None else None
                    out = policy_output(policy, value_model, micro.batch, filters=filters, head=True, ref=ref)
                else:
                    out = policy_output(policy, value_model, micro.batch, filters=filters)
                x = loss_inputs(out, micro, mb_prep.select(part), micro_ref)
                loss, stats = method.loss(x, cfg=cfg, beta=beta, counts=n)
                loss.backward()
                loss_sum += float(loss.detach())
                w = float(micro.mask.sum())
                for k, v in stats.items():  # the method's plain keys, logged as "<method>/<key>"
                    sums[f"{method.name}/{k}"] = sums.get(f"{method.name}/{k}", 0.0) + float(v) * w
                    counts[f"{method.name}/{k}"] = counts.get(f"{method.name}/{k}", 0.0) + w
                if "approx_kl_old" in stats:
                    kl_old[0] += float(stats["approx_kl_old"]) * w
                    kl_old[1] += w
            ro.pending = False  # (a pending rollout is one minibatch: every row is filled now)
            if aux is not None:
                for k, v in aux(
                    policy, step * cfg.num_epochs * cfg.num_minibatches + epoch * cfg.num_minibatches + m, dist
                ).items():
                    sums[f"{method.name}/{k}"] = sums.get(f"{method.name}/{k}", 0.0) + float(v)
                    counts[f"{method.name}/{k}"] = counts.get(f"{method.name}/{k}", 0.0) + 1.0
            dist.sync_gradients(params + value_params)
            norms.append(clip_and_norm(params, cfg.max_grad_norm))
            v = 0.0
            if value_params:
                v = clip_and_norm(value_params, cfg.max_grad_norm)
                sums[f"{method.name}/value_grad_norm"] = sums.get(f"{method.name}/value_grad_norm", 0.0) + v
                counts[f"{method.name}/value_grad_norm"] = counts.get(f"{method.name}/value_grad_norm", 0.0) + 1.0
            if guard is None or guard.check(dist, norms[-1], v, loss_sum):
                opt.step()
            opt.zero_grad(set_to_none=True)
            if cfg.target_kl_old is not None:
                # Global mean of this update's KL to the behaviour policy (measured before the step):
                # every process must take the same decision (CleanRL's target_kl, per minibatch).
                t = dist.sum(torch.tensor(kl_old, dtype=torch.float64))
                if float(t[0] / t[1].clamp(min=1)) > cfg.target_kl_old:
                    return sums, counts, norms, prep
    return sums, counts, norms, prep


# --------------------------------------------------------------------------------------------------
# Evaluation


def _as_reward_set(cfg: OnlineConfig, reward, log_rewards) -> RewardSet:
    """The RewardSet from config specs, or from objects passed to train_online."""
    if isinstance(reward, RewardSet):
        if log_rewards:
            raise ValueError("pass log_rewards inside the RewardSet (RewardSet(optimised, logged)), not both")
        return reward

    def source(r):
        if isinstance(r, RewardSource):
            return r
        if isinstance(r, str):
            return build_reward(r, assets=cfg.assets)
        if callable(r):
            return CallableSource(r)
        raise TypeError(
            f"a reward must be a spec string, a RewardSource or a function of completions; got {type(r).__name__}"
        )

    specs = reward_specs(cfg.reward if reward is None else reward)
    opt = combine_rewards([source(r) for r in specs], cfg.reward_weights)
    logged = [source(r) for r in (cfg.log_rewards if log_rewards is None else log_rewards)]
    return RewardSet(opt, logged, clip=cfg.reward_clip, normalize=cfg.reward_normalize)


def evaluate(
    policy,
    reference,
    rewards: RewardSet,
    tok,
    prompt_texts: Sequence[str],
    prompt_ids,
    *,
    cfg: OnlineConfig,
    rows: Optional[Sequence[Prompt]] = None,
) -> dict:
    """eval/kl (exact estimator, mean sequence KL) with its standard error, and the mean raw score
    of every reward source (optimised and logged) on the same samples. The normaliser is untouched.
    ``engine.evaluate``: the evaluation seed and batch size every trainer and the demo use (a fixed
    seed: eval noise is common to all steps). Every process evaluates the same prompts with the same
    seed (identical results; simple > fast). ``rows``: the prompts' dataset rows, for reward functions."""
    res = evaluate_kl(
        policy,
        reference,
        prompt_ids,
        tokenizer=tok,
        seed=cfg.seed,
        samples_per_prompt=cfg.eval_samples,
        sampling=sampling_settings(cfg),
    )
    flat = [p for p in prompt_texts for _ in range(cfg.eval_samples)]  # the engine's order: prompt-major
    completions = res["texts"]
    out = {
        "eval/kl": res["estimators"]["exact"]["mean"],
        "eval/kl_stderr": res["estimators"]["exact"]["stderr"],
        "eval/kl_token_mean": res["token_mean"],
        "eval/response_len": res["response_len"],
    }
    columns = reward_columns([r for r in rows for _ in range(cfg.eval_samples)]) if rows is not None else {}
    for src in rewards.sources:
        # mean and standard error across samples (float64, as the demo's and the sweep's evaluation); the
        # stderr is the reward-hacking monitor's noise gate (diagnostics/hacking.py)
        if isinstance(src, WeightedRewards):  # several rewards: each one's mean over the samples it applies to
            per_func = src.per_func(flat, completions, **columns)  # (n, K)
            for name, values in src.components(per_func).items():
                out[f"eval/reward/{name}/mean"] = nan_mean_std(values)[0]
            scores = weighted_reward_sum(per_func, src.weights)
        else:
            scores = call_source(src, flat, completions, columns).float()
        m, se = mean_stderr(checked_scores(src, scores))
        out[f"eval/reward/{src.name}"], out[f"eval/reward/{src.name}_stderr"] = m, se
    return out


# --------------------------------------------------------------------------------------------------
# The loop


def _validate(cfg: OnlineConfig, method: OnlineMethod) -> None:
    check_estimator(cfg.kl_estimator)
    check_reference_filter(cfg.kl_reference_filter)
    check_reference_form(
        cfg.reference,
        ONLINE_REFERENCE_FORMS,
        why=" (online methods score fresh samples every step, so the reference must be a live model)",
    )
    check_lora_reference(cfg)
    sampling_settings(cfg)  # the sampling group's ranges (groups.check_sampling)
    if cfg.loss_aggregation not in AGGREGATION_MODES:
        raise UserError(
            f"loss_aggregation must be one of {AGGREGATION_MODES}, got {cfg.loss_aggregation!r}; set --loss_aggregation"
        )
    if cfg.num_epochs < 1 or cfg.num_minibatches < 1:
        raise UserError("num_epochs and num_minibatches must be >= 1")
    bad = check_position_weights(decay=cfg.beta_position_decay, weights=cfg.beta_position_weights)
    if bad:
        raise UserError(f"{bad}; fix --beta_position_decay / --beta_position_weights")
    if cfg.ref_reset_optimizer and not cfg.ref_reset_every:
        raise UserError("ref_reset_optimizer needs ref_reset_every > 0 (the optimiser is reset with the reference)")
    if cfg.keep_dropout:
        raise UserError(
            "keep_dropout=true is not available for online methods: the sampler, the scorer and the loss "
            "must see one policy (with dropout, π_θ/π_old ≠ 1 and the step-0 KL ≠ 0, TRL #506); drop the flag"
        )
    check_correction(cfg)
    shared_prompt_mode(cfg.shared_prompt)
    chunked_head_mode(cfg.chunked_head)
    method.validate(cfg)


def _load_reference(cfg: OnlineConfig, policy, tok, path: str, dist: Dist):
    """The live reference (the online methods score fresh samples every step: no precomputed form)."""
    return reference_from_config(
        cfg, policy=policy, tokenizer=tok, policy_path=path, device=dist.device, forms=ONLINE_REFERENCE_FORMS
    )


def _prompt_mapped_reference(cfg: OnlineConfig, reference, tok, texts: Sequence[str]):
    """``reference`` scored on ``cfg.reference_prompt``(x) for every known prompt x (training and
    evaluation): the token map old ids -> ids of the transformed text, same encoding as the prompts."""
    from ..reference_prompt import PromptMappedReference, load_prompt_transform, transformed_prompt_map

    encode = lambda ts: encode_prompts(tok, ts, max_prompt_length=cfg.max_prompt_length)  # noqa: E731
    prompt_map = transformed_prompt_map(load_prompt_transform(cfg.reference_prompt), texts, encode(texts), encode)
    return PromptMappedReference(reference, prompt_map, pad_id=tok.pad_token_id)


EVAL_HOLDOUT_FRACTION = 0.1  # of a prompts file, held out for eval/* when no evaluation prompts are given


def _prompt_rows(
    cfg: OnlineConfig, tok, prompts, eval_prompts, *, hold_out: bool = True
) -> tuple[Sequence[Prompt], list[Prompt]]:
    """(training prompts, evaluation prompts) from the arguments of train_online (strings, row dicts or
    Prompts) or the config's files (``tether.data.prompts``). Evaluation prompts, the first of these
    that applies: ``eval_prompts`` (argument or field); a saved DatasetDict's test/validation split of
    ``--prompts``; a seeded 10% of a ``--prompts`` file (at most eval_max_prompts; none under 10
    prompts), held out of training when ``hold_out`` (an evaluation will run and no eval_hook replaces
    it); else the first training prompts, not held out (prompts given in memory: pass eval_prompts)."""
    kw = dict(tokenizer=tok, chat_template=cfg.chat_template, prompt_field=cfg.prompt_field)
    if prompts is not None:
        rows = as_prompts(prompts, **kw)
    elif cfg.prompts:
        rows = load_prompts(cfg.prompts, columns=cfg.columns, assets=cfg.assets, lazy=True, **kw)
    else:
        raise UserError(
            "no prompts: pass --prompts FILE (one prompt per line, JSONL with a 'prompt' field, or a datasets folder)"
        )
    if not rows:
        raise UserError("the prompt list is empty")
    from_file = eval_prompts is None and not cfg.eval_prompts and prompts is None
    held = eval_prompts_split(cfg.prompts) if from_file else None
    if eval_prompts is not None:
        ev = as_prompts(eval_prompts, **kw)
    elif cfg.eval_prompts:
        ev = load_prompts(cfg.eval_prompts, columns=cfg.columns, assets=cfg.assets, **kw)
    elif held:
        ev = load_prompts(cfg.prompts, columns=cfg.columns, assets=cfg.assets, split=held, **kw)
    elif from_file and hold_out and len(rows) >= 10:
        n_eval = min(cfg.eval_max_prompts, int(len(rows) * EVAL_HOLDOUT_FRACTION))
        rows, ev = hold_out_prompts(rows, n_eval, seed=cfg.seed)
        log.info(
            "eval/*: %d prompts of %s held out of training (give eval_prompts to choose them)", n_eval, cfg.prompts
        )
    else:
        if from_file and hold_out:
            log.info("eval/*: %d prompts are too few to hold any out; evaluating on training prompts", len(rows))
        ev = rows
    return rows, list(ev[: cfg.eval_max_prompts])


@dataclass
class Session:
    """Everything one run holds, built once by ``setup`` (models, data, optimiser, β, run directory)."""

    cfg: OnlineConfig
    method: OnlineMethod
    dist: Dist
    sizes: Sizes
    run: RunDir
    tok: object
    policy: torch.nn.Module
    reference: object
    value_model: Optional[torch.nn.Module]
    rewards: RewardSet
    texts: list  # training prompts and their token ids
    ids: list
    eval_texts: list
    eval_ids: list
    aux: Optional[Callable]  # PPO-ptx
    params: list  # policy parameters / value-model parameters (clipped separately)
    value_params: list
    opt: torch.optim.Optimizer
    sched: object
    controller: object
    ckpt: Checkpointer
    guard: StepGuard
    step: int = 0
    history: Optional[History] = None  # every step's metrics (runs.History: a file, the last row in memory)
    eval_history: list = field(default_factory=list)
    eval_hook: Optional[Callable] = (
        None  # eval_hook(step, policy, *, beta) -> metrics: the sampled evaluation (trainers.result)
    )
    prompt_rows: list = field(default_factory=list)  # the Prompt (dataset row) of each of texts / eval_texts
    eval_rows: list = field(default_factory=list)
    forgetting: Optional[Callable] = (
        None  # diagnostics.forgetting.ForgettingProbe (cfg.forgetting_text): eval/forgetting/*
    )
    hacking: Optional[HackingMonitor] = None  # eval/hacking, with logged rewards beside the optimised one

    def save(self) -> None:
        """Checkpoint, with what Checkpointer does not know about in its data state."""
        self.ckpt.save(
            self.step,
            data_state={
                "value_model": None if self.value_model is None else self.value_model.state_dict(),
                "rewards": self.rewards.state_dict(),
                "eval_history": self.eval_history,
            },
        )

    def evaluate(self) -> dict:
        with unsharded(*models_of(self.policy, self.reference)):  # fsdp: main-only and uneven forwards
            return self._evaluate()

    def _evaluate(self) -> dict:
        if self.eval_hook is not None:  # an external protocol (the demo's): same prompts and seeds for every method
            ev = (
                dict(self.eval_hook(self.step, self.policy, beta=self.controller.value) or {})
                if self.dist.is_main
                else {}
            )
        else:
            ev = evaluate(
                self.policy,
                self.reference,
                self.rewards,
                self.tok,
                self.eval_texts,
                self.eval_ids,
                cfg=self.cfg,
                rows=self.eval_rows or None,
            )
        if self.forgetting is not None:  # teacher-forced on off-distribution text, whichever protocol ran above
            ev.update(self.forgetting(self.policy, self.reference))
        self.eval_history.append({"step": self.step, **ev})
        if (
            self.hacking is None
            and {"eval/reward/gold", "eval/reward/proxy"} <= ev.keys()
            and self.rewards.optimised.name != "gold"
        ):  # an eval_hook's protocol (the demo, tether sweep); a run that optimises the gold has none to exploit
            self.hacking = HackingMonitor("proxy", ["gold"])
        if self.hacking is not None:  # gold stopped rising while the proxy rises (diagnostics/hacking.py)
            ev.update(self.hacking.check(self.eval_history, self.step))
        return ev

    def log_samples(self, ro: Rollout) -> None:
        n = min(self.cfg.num_logged_samples, len(ro.prompts))
        self.run.log_samples(
            self.step,
            [
                {
                    "prompt": ro.prompts[i],
                    "completion": ro.completions[i],
                    "score": float(ro.scores[i]),
                    **{k: float(v[i]) for k, v in ro.reward_metrics.items()},
                    **{f"reward/{k}": _value(v[i]) for k, v in ro.reward_components.items()},
                }
                for i in range(n)
            ],
        )


def _value(x: torch.Tensor) -> Optional[float]:
    """A reward's value for samples.jsonl: None where the function returned None (NaN)."""
    v = float(x)
    return None if v != v else v


def setup(
    cfg: OnlineConfig,
    method: OnlineMethod,
    *,
    prompts=None,
    reward=None,
    log_rewards=None,
    eval_prompts=None,
    resume: bool = False,
    validate: bool = True,
    hold_out: bool = True,
) -> Session:
    """Validate, load policy / reference / value model / rewards / prompts, build the optimiser and
    β controller, and restore the latest checkpoint if ``resume``."""
    if validate:  # (the preflight, when it ran, has: its checks include these)
        _validate(cfg, method)
    dist = Dist()
    sizes = derive_sizes(cfg, dist)
    run = RunDir(cfg.output_dir, is_main=dist.is_main, report_to=cfg.report_to)
    run.save_config(cfg, resume=resume)
    tok, policy, path = load_policy(cfg, dist)
    reference = _load_reference(cfg, policy, tok, path, dist)
    shard_reference(reference, policy)  # fsdp with reference=copy
    value_model = (
        build_value_model(
            cfg.value_model, policy, model_path=path, dtype=cfg.dtype, device=dist.device, autocast=cfg.autocast
        )
        if method.uses_value_model(cfg)
        else None
    )
    prompt_rows, eval_rows = _prompt_rows(cfg, tok, prompts, eval_prompts, hold_out=hold_out)
    texts, eval_texts = prompt_texts(prompt_rows), [p.text for p in eval_rows]  # a large file's: built on demand
    if cfg.reference_prompt:  # the reference-shift remedy: π_ref scored on g(x), the policy on x
        reference = _prompt_mapped_reference(cfg, reference, tok, list(texts) + eval_texts)
    cfg = with_epochs(cfg, len(texts), per_step=cfg.batch_size // cfg.samples_per_prompt, unit="prompts")
    params = trainable_params(policy)
    value_params = list(value_model.parameters()) if value_model is not None else []
    opt = make_optimizer(params + value_params, cfg)
    sched = make_scheduler(opt, cfg)
    controller = build_controller(cfg, total_steps=cfg.max_steps, episodes_per_step=cfg.batch_size)
    guard = StepGuard(cfg.max_nonfinite_steps)
    s = Session(
        cfg=cfg,
        method=method,
        dist=dist,
        sizes=sizes,
        run=run,
        tok=tok,
        policy=policy,
        reference=reference,
        value_model=value_model,
        rewards=_as_reward_set(cfg, reward, log_rewards),
        texts=texts,
        ids=prompt_ids(tok, texts, max_prompt_length=cfg.max_prompt_length),  # large: tokenised as steps draw them
        eval_texts=eval_texts,
        eval_ids=encode_prompts(tok, eval_texts, max_prompt_length=cfg.max_prompt_length),
        prompt_rows=prompt_rows,
        eval_rows=eval_rows,
        aux=method.make_aux(cfg, tok, dist) if method.make_aux is not None else None,
        params=params,
        value_params=value_params,
        opt=opt,
        sched=sched,
        controller=controller,
        ckpt=Checkpointer(
            run, policy, opt, sched, controller, reference, guard=guard, enabled=cfg.save_checkpoints, tokenizer=tok
        ),
        guard=guard,
        history=History(run),
    )
    if s.rewards.logged:
        s.hacking = HackingMonitor(s.rewards.optimised.name, [src.name for src in s.rewards.logged])
    if cfg.forgetting_text:
        from ..diagnostics.forgetting import ForgettingProbe

        s.forgetting = ForgettingProbe(
            cfg.forgetting_text,
            tok,
            config={**vars(cfg), "prompts": cfg.prompts or texts},
            assets=cfg.assets,
            max_texts=cfg.forgetting_max_texts,
            seed=cfg.seed,
        )
    if resume:
        s.step, state = s.ckpt.resume()
        if state.get("value_model") is not None and value_model is not None:
            value_model.load_state_dict(state["value_model"])
        if state.get("rewards") is not None:
            s.rewards.load_state_dict(state["rewards"])
        s.history, s.eval_history = History(run, legacy=state.get("history")), list(state.get("eval_history", []))
    return s


@accepts_objects
@preemptible
def train_online(
    cfg: OnlineConfig,
    *,
    method: Optional[OnlineMethod] = None,
    prompts: Optional[Sequence[str]] = None,
    reward=None,
    log_rewards=None,
    eval_prompts: Optional[Sequence[str]] = None,
    train_dataset=None,
    eval_dataset=None,
    resume: bool = False,
    eval_hook: Optional[Callable] = None,
    callbacks: Optional[Sequence] = None,
    preflight: bool = True,
) -> TrainResult:
    """Train with PPO, GRPO or RLOO (chosen by ``method``, default: by the config class).

    ``preflight``: first run the method's checks of the whole input (``tether.registry``'s preflight,
    ``checks.preflight_online``: what ``tether ppo`` runs; in-memory prompts and rewards replace the
    checks of the files and specs they stand for).

    ``prompts``, ``eval_prompts`` (lists of strings), ``reward`` (a spec, a ``RewardSource``, a
    function of completions, a list of these, weighted by ``cfg.reward_weights``, or a whole
    ``RewardSet``) and ``log_rewards`` (list of specs, sources or functions)
    override the config's file/spec fields. Returns a ``TrainResult``: ``final``, ``metrics`` (last step),
    ``history`` (every step's metrics), ``eval_history`` (rows of eval/kl, eval/kl_stderr,
    eval/reward/<name>, from step 0 — the reference itself — when eval_every > 0, and at the last step).
    ``eval_hook(step, policy, *, beta) -> metrics``, if given, is the sampled evaluation at those same
    points, instead of the built-in one (its one meaning in every loop: ``trainers.result``).

    ``model`` (a path, or a loaded model, peft or not), ``tokenizer``, ``peft_config``: ``tether.inputs``.
    ``train_dataset`` / ``eval_dataset``: ``prompts`` / ``eval_prompts`` as a ``datasets.Dataset`` (rows
    with a ``prompt`` column, text or chat messages, and any columns the reward functions read), a
    ``DatasetDict`` (its train split, and its test/validation split when no eval_dataset is given) or a
    list. ``callbacks``: ``tether.callbacks``.
    """
    prompts, eval_prompts = datasets_as_rows(
        train_dataset, eval_dataset, prompts, eval_prompts, names="prompts / eval_prompts"
    )
    if preflight:
        from ..registry import run_preflight

        run_preflight(
            cfg.method, cfg, prompts=prompts, eval_prompts=eval_prompts, reward=reward, log_rewards=log_rewards
        )
    s = setup(
        cfg,
        method or method_for(cfg),
        prompts=prompts,
        reward=reward,
        log_rewards=log_rewards,
        eval_prompts=eval_prompts,
        resume=resume,
        validate=not preflight,
        # an eval_hook brings its own prompts, and a run without evaluation needs none: all prompts train
        hold_out=eval_hook is None and bool(cfg.eval_every or cfg.eval_final),
    )
    s.eval_hook = eval_hook
    s.run.callbacks = Callbacks(callbacks, cfg, is_main=s.dist.is_main)
    s.run.callbacks.begin(cfg)
    cfg = s.cfg  # max_steps as setup derived it (epochs)
    backend = backend_for(cfg, s.policy)  # tether.generation: builtin (decoder auto | hf | lean) | vllm
    G, dist = cfg.samples_per_prompt, s.dist
    in_update = scores_from_update(cfg, s.method, s.sizes, s.value_model)  # no separate scoring pass of the policy
    shared = shared_prompt_mode(cfg.shared_prompt)  # each group's prompt computed once (tether.shared_prompt)
    if shared != "off" and is_sharded(s.policy):  # it calls the decoder and head directly, past fsdp's root all-gather
        log.info("shared_prompt: using the padded layout: the policy is sharded (fsdp)")
        shared = "off"
    if shared != "off" and (G == 1 or not supports_shared_prompt(s.policy)):  # (logs why not, once)
        shared = "off"
    # the update's scores from hidden states, the LM head a chunk at a time (no (micro, T, V) logits held)
    chunked = use_chunked_head(cfg, s.policy, s.reference, needs_reference=in_update or s.method.needs_ref_logits(cfg))
    if s.step == 0 and cfg.eval_every:  # the starting point (KL 0) of the reward-KL curve
        s.run.log(0, s.evaluate())
    bar = progress_bar(cfg.max_steps, s.step, enabled=cfg.progress and dist.is_main, desc=s.method.name)
    metrics: dict = s.history[-1] if s.history else {}
    while s.step < cfg.max_steps:
        # 1. this step's prompts (a pure function of (seed, step)), G contiguous copies each: a group
        idx = dist.shard(batch_indices(s.step, cfg.batch_size // G, len(s.texts), seed=cfg.seed))
        p_texts, p_ids = [s.texts[i] for i in idx for _ in range(G)], [s.ids[i] for i in idx for _ in range(G)]
        p_rows = [s.prompt_rows[i] for i in idx for _ in range(G)]
        # 2. rollout: sample, reward, score under policy / reference / value model
        beta = s.controller.value
        with unsharded(
            *models_of(s.policy, s.reference)
        ):  # fsdp: full weights to sample (ranks stop at different lengths)
            ro = collect_rollout(
                s.policy,
                s.reference,
                s.value_model,
                s.rewards,
                s.tok,
                p_texts,
                p_ids,
                cfg=cfg,
                generator=seeded(cfg.seed, s.step, dist.rank, 1, device=dist.device),
                chunk=s.sizes.micro,
                device=dist.device,
                prompt_rows=p_rows,
                backend=backend,
                score_models=not in_update,
                shared_prompt=shared,
            )
        # 3. advantages (method-specific, pure); when they read scores the update has yet to compute, there
        prep = (
            None
            if in_update and s.method.prepare_reads_scores(cfg)
            else s.method.prepare(
                scores=ro.scores, kl_tokens=ro.kl_tokens, mask=ro.mask, values=ro.values, cfg=cfg, beta=beta
            )
        )
        ref_logits = ref_hidden = None
        if s.method.needs_ref_logits(cfg) and not in_update and chunked:
            with torch.no_grad():
                ref_hidden = rollout_ref_hidden(s.reference, ro, chunk=s.sizes.micro)
        elif s.method.needs_ref_logits(cfg) and not in_update:
            with unsharded(*models_of(s.reference)):
                ref_logits = rollout_ref_logits(s.reference, ro, chunk=s.sizes.micro, filters=sampling_settings(cfg))
        # 4. epochs x minibatches of updates
        lr = s.sched.get_last_lr()[0]
        u_sums, u_counts, norms, prep = optimise(
            s.policy,
            s.value_model,
            s.opt,
            s.params,
            s.value_params,
            ro,
            prep,
            s.method,
            cfg=cfg,
            beta=beta,
            sizes=s.sizes,
            dist=dist,
            ref_logits=ref_logits,
            step=s.step,
            aux=s.aux,
            guard=s.guard,
            reference=s.reference,
            chunked=chunked,
            ref_hidden=ref_hidden,
        )
        sums, counts = rollout_stats(ro, beta=beta)
        add_mismatch_stats(sums, counts, ro, cfg)  # mismatch/*: the sampler's μ against π_old (ops.behaviour)
        n_tok = float(ro.mask.sum())
        for k, v in prep.stats.items():  # "<method>/<key>", as the loss's stats
            sums[f"{s.method.name}/{k}"], counts[f"{s.method.name}/{k}"] = float(v) * n_tok, n_tok
        step_schedule(s.sched)
        backend.update_weights(s.policy)  # the next rollout samples the updated policy (no-op for builtin)
        s.step += 1
        if s.reference.on_step(s.policy, s.step) and cfg.ref_reset_every and cfg.ref_reset_optimizer:
            s.opt.state.clear()  # ProRL: the reset also restarts Adam's moments (checkpointed as cleared)
        # 5. metrics (one global reduction), β update, logs, evaluation, checkpoint
        metrics = dist.reduce_metrics({**sums, **u_sums}, {**counts, **u_counts})
        metrics = {
            k: v for k, v in metrics.items() if v == v or not k.startswith("reward/rank_corr/")
        }  # constant rewards
        metrics.update(reward_component_stats(ro, dist))  # several rewards: reward/<name>/mean, /std
        metrics.update(
            {
                "beta": beta,
                "opt/lr": lr,
                "opt/grad_norm": sum(norms) / max(len(norms), 1),
                "opt/updates": len(norms),
                **s.guard.stats(),
            }
        )
        s.controller.update(kl=metrics["kl/ref"], n_episodes=cfg.batch_size)
        metrics.update(s.controller.stats())  # kl_ctl/*: the adaptive controller's error and saturation
        if (cfg.eval_every and s.step % cfg.eval_every == 0) or (s.step == cfg.max_steps and cfg.eval_final):
            metrics.update(s.evaluate())
        s.history.append({"step": s.step, **metrics})
        if s.step % cfg.log_every == 0 or s.step == cfg.max_steps or "eval/kl" in metrics:
            s.run.log(s.step, metrics)
        if cfg.sample_every and (s.step % cfg.sample_every == 0 or s.step == 1):
            s.log_samples(ro)
        if cfg.save_every and s.step % cfg.save_every == 0 and s.step < cfg.max_steps:
            s.save()
        stop_if_signalled(s.step, cfg.max_steps, dist, s.ckpt, save=s.save)  # a signal: checkpoint, exit 75
        bar.update(1)
        bar.set_postfix(
            postfix(score=(metrics.get("reward/score"), ".3f"), kl=(metrics.get("kl/ref"), ".2f"), beta=(beta, ".3g"))
        )
        if s.run.callbacks.should_stop(dist):  # a callback asked to stop: this step is the last
            break
    bar.close()
    s.save()
    final = save_final(s.policy, cfg.output_dir, tokenizer=s.tok, merge_lora=cfg.merge_lora, is_main=dist.is_main)
    s.run.close()
    dist.finish()
    result = TrainResult(final=str(final), metrics=metrics, history=s.history.rows(), eval_history=s.eval_history)
    s.run.callbacks.end(result)
    return result


def method_for(cfg: OnlineConfig) -> OnlineMethod:
    """The method a config class belongs to (its ``method`` class attribute, a name in ``tether.registry``)."""
    from ..registry import METHODS

    spec = METHODS.get(cfg.method)
    if spec is None or not spec.is_online:
        names = ", ".join(n for n, m in METHODS.items() if m.is_online)
        raise ValueError(f"{type(cfg).__name__} names no online method (method={cfg.method!r}); registered: {names}")
    return spec.load("online")
