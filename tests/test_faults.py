"""What clusters and disks do to a run (docs/reliability.md): a failing write at each point of the
checkpoint sequence, a full disk (a small tmpfs, where root may mount one), save_total_limit, the
run directory's lock, and the preemption machinery (tether.preempt) in process.

The command-line tests (signals sent to ``python -m tether dpo`` / ``grpo``, a second process on a
live run's folder) are in tests/test_preemption.py.
"""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from test_reliability import rows, sft_cfg, weights

import tether.runs as runs
from tether import preempt
from tether.errors import UserError
from tether.trainers.sft import train_sft


def files(folder: Path) -> dict:
    """Every file under ``folder``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight3(assets_dir, tmp_path_factory):
    """An uninterrupted 3-step sft run: what every recovered run must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=3))
    return out


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_model(real):
    """save_model that writes part of the weights file, then finds the disk full."""

    def save_model(model, path, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 1000)
        _enospc()

    return save_model


def _state_tensors_fail(monkeypatch):
    """safetensors' own error for a full disk, raised by the trainer state's tensor file."""
    import safetensors.torch as st

    real = st.save_file

    def save_file(tensors, filename, *a, **k):
        if Path(filename).name == "trainer_state.safetensors":
            Path(filename).write_bytes(b"\0" * 100)
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)


def _state_json_fails(monkeypatch):
    real = Path.write_text

    def write_text(self, data, *a, **k):
        if self.name == "trainer_state.json":
            real(self, data[: len(data) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)


def _rename_fails(monkeypatch):
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp") and Path(src).is_dir():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(runs.os, "replace", replace)


FAULTS = {
    "model weights": (
        lambda mp: mp.setattr(runs, "save_model", _partial_model(runs.save_model)),
        "No space left on device",
    ),
    "trainer state tensors": (_state_tensors_fail, "No space left on device"),
    "trainer state json": (_state_json_fails, "Input/output error"),
    "fsync": (lambda mp: mp.setattr(runs, "_fsync_tree", lambda p: _enospc()), "No space left on device"),
    "rename": (_rename_fails, "Input/output error"),
}


@pytest.mark.parametrize("point", list(FAULTS))
def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint_and_final(
    point, assets_dir, tmp_path, monkeypatch, straight3
):
    """A 2-step run (save_total_limit=1: only step-2 is kept) is resumed to step 3, whose checkpoint
    write fails at ``point``. The run ends with a UserError naming checkpoints/step-3 and the cause;
    step-2 and final/ are byte for byte as they were, no partial folder is left; once the disk is
    fixed, --resume ends exactly (metrics and weights bit for bit) as the uninterrupted run."""
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=2, save_total_limit=1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    before_ckpt, before_final = files(out / "checkpoints"), files(out / "final")
    inject, cause = FAULTS[point]
    with monkeypatch.context() as mp:
        inject(mp)
        with pytest.raises(
            UserError,
            match=rf"could not write {out / 'checkpoints' / 'step-3'}: {cause}.*left as they "
            rf"were: {out / 'checkpoints' / 'step-2'}, {out / 'final'}.*--resume",
        ):
            train_sft(sft_cfg(assets_dir, out, max_steps=3, save_total_limit=1), resume=True)
    assert files(out / "checkpoints") == before_ckpt and files(out / "final") == before_final
    assert not list(out.glob("final.*"))
    train_sft(sft_cfg(assets_dir, out, max_steps=3, save_total_limit=1), resume=True)
    assert rows(out) == rows(straight3)
    a, b = weights(straight3 / "final"), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]


def test_a_failing_final_write_keeps_the_previous_final(assets_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=1))
    before = files(out / "final")
    real = runs.save_model
    with monkeypatch.context() as mp:
        mp.setattr(
            runs,
            "save_model",
            lambda model, path, **kw: (
                _partial_model(real)(model, path, **kw) if Path(path).name == "final.tmp" else real(model, path, **kw)
            ),
        )
        with pytest.raises(
            UserError, match=rf"could not write {out / 'final'}: No space left on device.*previous final/"
        ):
            train_sft(sft_cfg(assets_dir, out, max_steps=2), resume=True)
    assert files(out / "final") == before and not (out / "final.tmp").exists()
    assert (out / "checkpoints" / "step-2").is_dir()  # the checkpoint before it was written: --resume finishes


def test_replacing_a_checkpoint_of_the_same_step_puts_the_old_one_back_if_the_rename_fails(tmp_path, monkeypatch):
    tmp, final = tmp_path / "step-1.tmp", tmp_path / "step-1"
    tmp.mkdir(), final.mkdir()
    (tmp / "f").write_text("new"), (final / "f").write_text("old")
    real = os.replace
    monkeypatch.setattr(runs.os, "replace", lambda s, d: _enospc() if Path(s) == tmp else real(s, d))
    with pytest.raises(OSError):
        runs._replace_dir(tmp, final)
    assert (final / "f").read_text() == "old" and not (tmp_path / "step-1.old").exists()
    monkeypatch.setattr(runs.os, "replace", real)
    runs._replace_dir(tmp, final)
    assert (final / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_a_full_metrics_log_is_one_line_naming_the_file(tmp_path, monkeypatch):
    run = runs.RunDir(tmp_path, tensorboard=False)
    monkeypatch.setattr("builtins.open", lambda *a, **k: _enospc())
    with pytest.raises(
        UserError, match=rf"could not write {tmp_path / 'metrics.jsonl'}: No space left on device \(ENOSPC\)"
    ):
        run.log(1, {"loss": 1.0})


@pytest.mark.parametrize(
    "limit,kept", [(1, ["step-4"]), (2, ["step-3", "step-4"]), (0, ["step-1", "step-2", "step-3", "step-4"])]
)
def test_save_total_limit(limit, kept, tmp_path):
    """save_total_limit checkpoints are kept (0: all), the newest; TRL's key reads as the same field."""
    run = runs.RunDir(tmp_path, tensorboard=False)
    run.keep = limit
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path, **kw: Path(path, "model.safetensors").write_bytes(b"w")
    for step in range(1, 5):
        run.save_checkpoint(step, model=model, state={"step": step})
    assert [p.name for p in reversed(run.checkpoints_newest_first())] == kept


def test_save_total_limit_is_read_from_the_config_and_may_change_on_resume(assets_dir, tmp_path):
    from tether.config import from_dict
    from tether.trainers.sft import SFTConfig

    assert from_dict(SFTConfig, {"save_total_limit": 5}).save_total_limit == 5
    with pytest.raises(UserError, match=r"save_total_limit=-1 must be >= 0.*set --save_total_limit"):
        train_sft(sft_cfg(assets_dir, tmp_path / "bad", save_total_limit=-1))
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=3, save_total_limit=0))
    assert len(list((out / "checkpoints").iterdir())) == 3
    train_sft(sft_cfg(assets_dir, out, max_steps=4, save_total_limit=1), resume=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]


def test_full_tmpfs(assets_dir, tmp_path, capsys):
    """A real full disk: a 5 MiB tmpfs holds a 1-step run (checkpoint 3.1 MB, final/ 1.1 MB) but not a
    second checkpoint. ``tether sft --resume`` to step 2 ends with exit 2 and one line (safetensors'
    ENOSPC) naming step-2; step-1 and final/ are intact; after growing the tmpfs, --resume finishes."""
    from tether.cli import main

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs needs root (and a container that allows it)")
    try:
        out = mnt / "run"
        train_sft(sft_cfg(assets_dir, out, max_steps=1, save_every=1))
        before_ckpt, before_final = files(out / "checkpoints"), files(out / "final")
        capsys.readouterr()
        argv = [
            "sft",
            "--model",
            str(assets_dir / "stories260K"),
            "--dataset",
            str(assets_dir / "rt-polarity" / "rt-polarity.pos"),
            "--output_dir",
            str(out),
            "--eval_examples",
            "0",
            "--batch_size",
            "4",
            "--max_length",
            "16",
            "--learning_rate",
            "1e-3",
            "--progress",
            "false",
            "--max_steps",
            "2",
            "--save_every",
            "1",
            "--resume",
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
            f"tether sft: error: could not write {out / 'checkpoints' / 'step-2'}: No space left on device (ENOSPC); "
            "left as "
            f"they were: {out / 'checkpoints' / 'step-1'}, {out / 'final'}; free space"
        )
        assert files(out / "checkpoints") == before_ckpt and files(out / "final") == before_final
        subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], check=True)
        train_sft(sft_cfg(assets_dir, out, max_steps=2, save_every=1), resume=True)
        assert [r["step"] for r in rows(out)] == [1, 2]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------- one writer per run directory


def test_a_second_writer_in_another_process_is_refused_and_overwrite_deletes_nothing(assets_dir, tmp_path):
    """A process holding the lock (flock on run.lock, as a live run does) keeps another run out of
    the folder, --overwrite included; the message names its PID. When it dies the lock goes with it."""
    out = tmp_path / "run"
    train_sft(sft_cfg(assets_dir, out, max_steps=1))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, os, sys, time; fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); "
            "os.write(fd, f'pid {os.getpid()} on host h'.encode()); print(flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        holder.stdout.readline()
        before = files(out)
        with pytest.raises(
            UserError, match=rf"output_dir {out} is in use by another run \(pid {holder.pid} on host h\)"
        ):
            train_sft(sft_cfg(assets_dir, out, max_steps=1, overwrite=True, seed=1))
        assert files(out) == before
    finally:
        holder.kill()
        holder.wait()
    train_sft(sft_cfg(assets_dir, out, max_steps=1, overwrite=True, seed=1))  # kill -9 left no stale lock
    assert f"pid {os.getpid()} on host" in (out / "run.lock").read_text()
    assert not runs.held_locks()  # released when the run ended


def test_the_lock_is_released_when_a_run_fails(assets_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(runs, "save_model", _partial_model(runs.save_model))
    with pytest.raises(UserError, match="could not write"):
        train_sft(sft_cfg(assets_dir, out, max_steps=1))
    assert not runs.held_locks()


# ---------------------------------------------------------------- preemption, in process


class _Ranks:
    """A Dist stand-in with two processes: the other one was signalled when ``theirs``."""

    enabled = True

    def __init__(self, theirs: bool):
        self.theirs, self.finished = theirs, False

    def sum_float(self, x: float) -> float:
        return x + float(self.theirs)

    def finish(self) -> None:
        self.finished = True


class _Ckpt:
    def __init__(self, tmp_path):
        self.run, self.saved, self.saved_step = runs.RunDir(tmp_path, tensorboard=False), [], None

    def save(self, step):
        self.saved.append(step)
        self.saved_step = step


def test_every_process_stops_after_the_same_step_when_one_is_signalled(tmp_path):
    """The flag is all-reduced: a process that received nothing stops (checkpoint, barrier, Preempted)
    when another did; nothing happens when none did, nor at the last step (the run finishes)."""
    assert preempt.install()
    try:
        ck = _Ckpt(tmp_path)
        preempt.stop_if_signalled(3, 10, _Ranks(theirs=False), ck)
        preempt.stop_if_signalled(10, 10, _Ranks(theirs=True), ck)
        assert ck.saved == []
        dist = _Ranks(theirs=True)
        with pytest.raises(
            preempt.Preempted,
            match=r"stopped by a signal on another process after step 3; checkpoint "
            rf"{tmp_path / 'checkpoints' / 'step-3'}; continue with --resume",
        ):
            preempt.stop_if_signalled(3, 10, dist, ck)
        assert ck.saved == [3] and dist.finished
        ck.saved_step = 4  # this step's periodic checkpoint is written already: not twice
        with pytest.raises(preempt.Preempted):
            preempt.stop_if_signalled(4, 10, _Ranks(theirs=True), ck)
        assert ck.saved == [3]
    finally:
        preempt.restore()


def test_signals_set_a_flag_and_a_second_ctrl_c_stops_at_once():
    before = {s: signal.getsignal(s) for s in preempt.SIGNALS}

    @preempt.preemptible
    def scheduler():
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested() == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # the same request again: still only a flag
        assert preempt.requested() == signal.SIGTERM
        return "done"

    @preempt.preemptible
    def person():
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a flag...
        assert preempt.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # ...the second: at once
        return "done"

    assert scheduler() == "done" and person() == "done"
    assert {s: signal.getsignal(s) for s in preempt.SIGNALS} == before  # the caller's handlers are back


def test_preempted_sft_resumes_bit_identically(assets_dir, tmp_path, straight3, monkeypatch):
    """A stop requested during step 2's update (as a signal handler would) ends the run after step 2
    with its checkpoint, Preempted, and the handlers restored; --resume equals the uninterrupted run."""
    import tether.trainers.sft as sft_mod

    real, calls = sft_mod.optimizer_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            preempt.request(signal.SIGTERM)
        return real(*a, **k)

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(sft_mod, "optimizer_step", step)
        with pytest.raises(preempt.Preempted, match="stopped by SIGTERM after step 2"):
            train_sft(sft_cfg(assets_dir, out, max_steps=3, save_every=0))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"] and not (out / "final").exists()
    assert not runs.held_locks() and signal.getsignal(signal.SIGTERM) is not preempt._handler
    train_sft(sft_cfg(assets_dir, out, max_steps=3, save_every=0), resume=True)
    assert rows(out) == rows(straight3)
    a, b = weights(straight3 / "final"), weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
