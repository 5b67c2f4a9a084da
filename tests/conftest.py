"""Test configuration: real assets from ../shared/assets (never copied into the repo)."""

import inspect
import json
import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_shared = ROOT.parent / "shared" / "assets"
if not os.environ.get("TETHER_ASSETS") and _shared.is_dir():
    os.environ["TETHER_ASSETS"] = str(_shared)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tests run as 2 xdist workers on 2 cores


def _assets() -> Path:
    path = os.environ.get("TETHER_ASSETS")
    if not path or not Path(path).is_dir():
        pytest.skip("real assets not available: set TETHER_ASSETS to a folder laid out like shared/assets")
    return Path(path)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return _assets()


@pytest.fixture(scope="session")
def stories_path(assets_dir) -> str:
    return str(assets_dir / "stories260K")


@pytest.fixture(scope="session")
def stories(stories_path):
    """(tokenizer, model) of the real stories260K, loaded once per worker; tests must not mutate it."""
    from tether.modeling import load_causal_lm, load_tokenizer

    return load_tokenizer(stories_path), load_causal_lm(stories_path)


# Float32 tolerances. Rounding is relative: each float32 operation may be off by half a spacing of
# its result, and the spacing near x is about F32_EPS·|x|. An error budget therefore scales with the
# largest quantities a result was computed from, not with the result: DPO's loss at π_θ = π_ref is
# ln 2 ≈ 0.69, but it is computed from sequence log-prob sums of ~-150 nats, whose float32 spacing is
# 1.5e-5; β·(c - c_ref - r + r_ref) of four such sums moves the loss by up to β/2 times their rounding.
F32_EPS = float(torch.finfo(torch.float32).eps)  # 2**-23: the spacing of float32 numbers in [1, 2)


def f32_tol(*magnitudes: float, ulps: float = 8) -> float:
    """Absolute tolerance for a float32 result compared with its exact value: ``ulps`` float32
    spacings of each magnitude it was computed from, added up (pass every large intermediate, each
    weighted by how much it moves the result). ``ulps`` = 8 covers rounding accumulated over a few
    dozen operations (a sum of T terms drifts by about √T spacings in practice) with a margin; a test
    that needs more says why."""
    return ulps * F32_EPS * sum(abs(float(m)) for m in magnitudes)


@torch.no_grad()
def logit_magnitude(model, input_ids: torch.Tensor, **forward_kw) -> float:
    """max over positions and vocabulary of Σ_i |h_i|·|W_vi|: the size of the dot products a logit is
    accumulated from (h the last hidden state, W the LM head). Two kernels (or layouts) that compute
    the same logit differ by a few float32 spacings of this, not of the logit itself."""
    model_was_training = model.training
    out = model.eval()(input_ids=input_ids, output_hidden_states=True, **forward_kw)
    model.train(model_was_training)
    head = model.get_output_embeddings().weight
    return float((out.hidden_states[-1].abs() @ head.abs().t()).max())


def seq_logps_tol(magnitude: float, tokens: int, ulps: float = 8) -> float:
    """Tolerance of a sequence log-prob sum over ``tokens`` completion tokens computed by two kernels
    or layouts: each token's log-prob is logit − logsumexp, both carrying rounding of ``magnitude``
    (``logit_magnitude``), so the sum's budget is ulps·ε·2·tokens·magnitude (a worst case: rounding
    errors that add up with one sign)."""
    return f32_tol(2 * tokens * magnitude, ulps=ulps)


def measured_tol(worst: float, headroom: float = 4.0) -> float:
    """Tolerance for a quantity no float32 bound reaches cheaply (a trajectory after several optimiser
    steps, where Adam turns a rounding-sized gradient element into a ±lr step): ``headroom`` times the
    worst deviation ``tests/tolerance_report.py`` measured at that call site over its kernel settings
    (native, AVX2 and SSE4.2 dispatch in ATen and MKL). Pass the measured number itself, so the next
    reader sees both; a test that uses it also asserts the effect it guards is far larger."""
    return headroom * worst


def dpo_log2_tol(row: dict, beta: float) -> float:
    """Tolerance of a logged DPO loss at π_θ = π_ref against ln 2 (rows of metrics.jsonl).

    loss = mean_i -log σ(h_i), h_i = β((c_i - c_ref,i) - (r_i - r_ref,i)), exactly 0 in exact
    arithmetic. d(-log σ(h))/dh = -1/2 at h = 0, so rounding δ in the four sequence sums moves the
    loss by (β/2)·Σ|δ| ≤ (β/2)·k·F32_EPS·(|c| + |c_ref| + |r| + |r_ref|) = k·F32_EPS·β·(|c| + |r|)
    (the reference sums equal the policy's; log-probs are negative, so the mean of |·| is |mean|),
    plus the rounding of ln 2 itself. Measured on stories260K (48 tokens, β = 0.1, 4 seeds x 3
    steps): at most 0.41 of the k = 1 budget; the flaky abs=1e-6 was 0.3 of it."""
    return f32_tol(math.log(2), beta * (abs(row["logps/chosen"]) + abs(row["logps/rejected"])))


def assert_close(got, want, *, abs: float = 0.0, rel: float = 0.0, what: str = "") -> None:
    """Elementwise |got - want| <= abs + rel·|want|, for numbers, equal-length sequences or tensors.

    Use it for every comparison whose tolerance is derived or measured (not for exact values): with
    ``TETHER_TOL_LOG=FILE`` set, each call appends the worst ratio |got - want| / (abs + rel·|want|)
    seen at its call site to FILE, so ``tests/tolerance_report.py`` can show how much headroom each
    tolerance has on this machine and under other CPU kernels (see that script)."""
    g = torch.as_tensor(got, dtype=torch.float64).flatten()
    w = torch.as_tensor(want, dtype=torch.float64).flatten()
    assert g.shape == w.shape, f"{what}: {g.numel()} values against {w.numel()}"
    budget = abs + rel * w.abs()
    err = (g - w).abs()
    both_nan = g.isnan() & w.isnan()
    err = torch.where(both_nan | (g == w), torch.zeros_like(err), err)  # equal infinities and NaNs agree
    ratio = torch.where(err == 0, torch.zeros_like(err), err / budget)
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if os.environ.get("TETHER_TOL_LOG"):
        frame = inspect.stack()[1]
        site = f"{Path(frame.filename).name}:{frame.lineno}"
        with open(os.environ["TETHER_TOL_LOG"], "a") as f:
            f.write(
                json.dumps(
                    {"site": site, "what": what, "ratio": worst, "max_err": float(err.max()) if err.numel() else 0.0}
                )
                + "\n"
            )
    if not worst <= 1.0:
        i = int(ratio.argmax())
        raise AssertionError(
            f"{what or 'values'} differ at index {i}: {float(g[i])!r} vs {float(w[i])!r} "
            f"(|diff| {float(err[i]):.3g} > budget {float(budget[i]):.3g})"
        )


def _test_site() -> str | None:
    """file:line of the innermost frame in a tests/test_*.py file (the assertion's call site)."""
    for frame in inspect.stack()[2:]:
        name = Path(frame.filename).name
        if name.startswith("test_") and name.endswith(".py"):
            return f"{name}:{frame.lineno}"
    return None


def _record_every_tolerance(log: str) -> None:
    """With TETHER_TOL_LOG set, record the worst |actual - expected| / tolerance of every
    ``pytest.approx`` and ``torch.testing.assert_close`` comparison made from a test file (measurement
    only: outcomes are unchanged). ``tests/tolerance_report.py`` reads the log."""
    import _pytest.approx as approx_mod

    def write(ratio: float, err: float) -> None:
        site = _test_site()
        if site is not None and math.isfinite(ratio):
            with open(log, "a") as f:
                f.write(json.dumps({"site": site, "what": "", "ratio": ratio, "max_err": err}) + "\n")

    scalar_eq = approx_mod.ApproxScalar.__eq__

    def eq(self, actual):
        ok = scalar_eq(self, actual)
        try:
            err = abs(float(actual) - float(self.expected))
            tol = float(self.tolerance)
            write(err / tol if tol > 0 else (0.0 if err == 0 else math.inf), err)
        except (TypeError, ValueError, OverflowError):
            pass
        return ok

    approx_mod.ApproxScalar.__eq__ = eq
    torch_close = torch.testing.assert_close

    def close(actual, expected, *args, rtol=None, atol=None, **kw):
        try:
            a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
            if rtol is None or atol is None:  # torch's defaults for the expected dtype
                dt = torch.as_tensor(expected).dtype
                rtol, atol = (
                    {torch.float64: (1e-7, 1e-7), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}.get(
                        dt, (1.3e-6, 1e-5)
                    )
                    if dt.is_floating_point
                    else (0, 0)
                )
            err = (a - e).abs()
            ratio = torch.where(err == 0, torch.zeros_like(err), err / (atol + rtol * e.abs()))
            if ratio.numel():
                write(float(ratio.max()), float(err.max()))
        except (TypeError, ValueError, RuntimeError):
            pass
        return torch_close(actual, expected, *args, rtol=rtol, atol=atol, **kw)

    torch.testing.assert_close = close
    torch_allclose = torch.allclose

    def allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=False):
        err = (a.double() - b.double()).abs()
        ratio = torch.where(err == 0, torch.zeros_like(err), err / (atol + rtol * b.double().abs()))
        if ratio.numel():
            write(float(ratio.max()), float(err.max()))
        return torch_allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)

    torch.allclose = allclose


if os.environ.get("TETHER_TOL_LOG"):
    _record_every_tolerance(os.environ["TETHER_TOL_LOG"])


def rendered_dom(page: Path) -> tuple[str, tuple[int, int]]:
    """``page`` rendered by headless Chromium (Debian's ``chromium``, installed when missing and root may):
    (the DOM after load, (images on the page, images decoded)); the reports count both into the body's
    data-images / data-images-loaded attributes on the load event. Skips when no chromium can be had."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip(
            "chromium is not installed and cannot be installed here (needs root and apt-get): "
            "the headless-browser check of report.html is skipped"
        )
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    args += ["--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([exe, *args, Path(page).as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:500]
    counts = [re.search(rf'{k}="(\d+)"', body.group(0)) for k in ("data-images", "data-images-loaded")]
    assert all(counts), body.group(0)
    return dom, (int(counts[0].group(1)), int(counts[1].group(1)))
