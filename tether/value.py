"""The value model V(s_t) that PPO's GAE needs, in one of two forms (config ``value_model``):

- ``critic``: a separate copy of the policy's backbone (the transformer without its LM head) with a
  scalar head, as in InstructGPT (the value function is initialised from the reward model there; here
  from the policy's starting weights, as in TRL's ``PPOTrainer`` when no value model is given). Its
  own forward pass per batch; twice the trainable parameters, no interference with the policy.
- ``head``: a scalar head on the policy's last hidden state (Ziegler et al. 2019's shared-trunk
  variant, TRL's old ``AutoModelForCausalLMWithValueHead``). One forward pass serves both; the value
  loss also moves the policy's backbone (weighted by ``vf_coef``).

Positions: the completion-token t is predicted at prompt-and-completion position P - 1 + t, and the
value of the state s_t = (x, y_<t) is read at the same position, so ``values`` is (B, T) and aligned
with ``logps``/``rewards``/``mask`` of the ``CompletionBatch``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .modeling import CompletionBatch, position_ids

VALUE_MODELS = ("critic", "head")


class ValueModel(nn.Module):
    """V(s_t) per completion position. ``kind`` is ``critic`` (own backbone) or ``head`` (reads the
    policy's hidden states, passed as ``policy_hidden``)."""

    def __init__(self, kind: str, hidden_size: int, *, backbone: Optional[nn.Module] = None, dtype=torch.float32):
        super().__init__()
        if kind not in VALUE_MODELS:
            raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {kind!r}")
        if kind == "critic" and backbone is None:
            raise ValueError("value_model 'critic' needs a backbone")
        self.kind = kind
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, dtype=dtype)
        # Zero init: V ≡ 0 at the start, so the first advantages are plain reward-to-go and an
        # untrained head cannot inject noise of the scale of the hidden states.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def needs_policy_hidden(self) -> bool:
        return self.kind == "head"

    def values(self, batch: CompletionBatch, *, policy_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) fp32 values of the states before each completion token, 0 where ``batch.mask`` is False."""
        if self.kind == "head":
            if policy_hidden is None:
                raise ValueError("value_model 'head' reads the policy's hidden states: pass policy_hidden=")
            h = policy_hidden  # (B, T, H)
        else:
            T = batch.mask.shape[1]
            out = self.backbone(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=position_ids(batch.attention_mask),
                use_cache=False,
            )
            h = out.last_hidden_state[:, -(T + 1) : -1, :]  # (B, T, H)
        v = self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, T)
        return v.masked_fill(~batch.mask, 0.0)


def build_value_model(
    kind: str, policy, *, model_path, dtype: str = "float32", device="cpu", autocast: bool = False
) -> ValueModel:
    """The value model for ``policy``. ``critic`` loads a fresh copy of the starting weights from
    ``model_path`` (a folder, or a ``training.Start``) and keeps only the backbone (a LoRA policy still
    gets a fully trainable critic)."""
    from .modeling import DTYPES, load_causal_lm

    hidden = int(policy.config.hidden_size) if hasattr(policy, "config") else None
    if kind == "critic":
        lm = (
            load_causal_lm(model_path, dtype=dtype, device=device)
            if isinstance(model_path, str)
            else model_path.load(dtype=dtype, device=device)
        )
        for p in lm.parameters():  # (a copied model object's weights come frozen) the critic trains
            p.requires_grad_(True)
        backbone = lm.base_model  # the transformer without the LM head
        if autocast:
            from .modeling import autocast_forward

            autocast_forward(backbone)
        hidden = int(lm.config.hidden_size)
        vm = ValueModel("critic", hidden, backbone=backbone, dtype=DTYPES[dtype])
    elif kind == "head":
        if hidden is None:
            raise ValueError("value_model 'head' needs a policy with config.hidden_size")
        vm = ValueModel("head", hidden, dtype=DTYPES[dtype])
    else:
        raise ValueError(f"value_model must be one of {VALUE_MODELS}, got {kind!r}")
    vm.to(device)
    vm.eval()  # no dropout in the critic either: values at rollout and in the update see the same net
    return vm
