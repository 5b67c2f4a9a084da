"""Failure-mode diagnostics of the KL penalty (docs/diagnostics.md): measurements a user runs on their own run.

- ``forgetting``: teacher-forced NLL change and exact KLs on off-distribution text, and the forward KL
  E_x[KL(π_ref‖π_θ)] on the training prompts (``tether forgetting``, ``eval/forgetting/*``).
- ``overfit``: the overfit-DPO detector (``dpo/overfit``).
- ``shift``: the reference-shift diagnostic: log π_ref(y|x) against log π_ref(y|p+x), the policy's KL under the
  plain and prefixed reference, a prefix search (``tether shift``; the remedy is ``tether.reference_prompt``).
- ``hacking``: the reward-hacking monitor: proxy/gold rank correlation (``reward/rank_corr/<name>``), Gao et al.'s
  curve fit (``fit_gao``) and the turn detector (``eval/hacking``).
"""
