"""Pure torch math: tensors and keyword-only hyperparameters in, tensors (and stats) out.

Nothing here imports transformers, accelerate, peft or torch.distributed.
"""
