"""tether: KL-regularised fine-tuning of language models.

Layers: ``tether.ops`` holds the pure torch math (log-probs, KL estimators, losses,
advantages); ``tether.control`` the β controllers; ``tether.reference`` is the one place that owns
the reference model; trainers and the CLI orchestrate them.
"""

__version__ = "0.1.0"
