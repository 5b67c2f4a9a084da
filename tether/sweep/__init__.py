"""``tether sweep``: a grid of trainer runs, evaluated with one protocol, and the reward–KL frontier report.

- ``spec``: the SWEEP.yaml (``SweepConfig``, ``EvalSpec``) and its expansion into runs;
- ``worker``: one run in its own process (``python -m tether.sweep.worker RUN/spec.json``);
- ``runner``: the process pool, resume markers, and the rows of every run;
- ``report``: frontier.csv, frontier.png, overoptimisation.png and report.html.
"""
