"""Nothing the user owns is lost: finished and running runs are not replaced, a full disk keeps the previous
checkpoint, partial files go, ``--resume`` is exact (metrics, best model) or a clear error, SIGTERM/SIGINT
save a checkpoint, ``--eval-only`` writes beside the run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from test_engine_helpers import FakeDataTrainer, captured_log, losses_of, tiny_cfg

from surgdino.cli import main
from surgdino.engine import checkpointer as C
from surgdino.engine import hooks as H
from surgdino.engine.output_dir import LOCK_NAME, OutputLock
from surgdino.engine.trainer import HookBase
from surgdino.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny real dataset and a config of the fast test model (EngineTestNet) for command-line runs."""
    from surgdino.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("trays")
    info = generate_synthetic_dataset(str(root), num_train=4, num_val=2, num_classes=3, image_size=48,
                                      instances_per_image=(1, 2), progress=False)
    cfg = {
        "MODEL": {"META_ARCHITECTURE": "EngineTestNet", "DEVICE": "cpu", "SEM_SEG_HEAD": {"NUM_CLASSES": 3}},
        "DATASETS": {"REGISTER": [
            {"name": "lost_train", "json_file": info["train_json"], "image_root": info["train_dir"]},
            {"name": "lost_val", "json_file": info["val_json"], "image_root": info["val_dir"]}],
            "TRAIN": ["lost_train"], "TEST": []},
        "INPUT": {"MIN_SIZE_TRAIN": [48], "MAX_SIZE_TRAIN": 48, "MIN_SIZE_TEST": 48, "MAX_SIZE_TEST": 48},
        "DATALOADER": {"NUM_WORKERS": 0},
        "SOLVER": {"IMS_PER_BATCH": 2, "BASE_LR": 0.01, "MAX_ITER": 4, "WARMUP_ITERS": 0, "STEPS": [],
                   "CHECKPOINT_PERIOD": 2, "LOG_PERIOD": 1},
        "SEED": 1,
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"yaml": str(path), **info}


def _run(args, capsys):
    capsys.readouterr()
    rc = main(args)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()  # the progress bar aside
    return rc, out.out, [line for line in lines if line.strip() and (not line.startswith(("train:", " ")) or
                                                                    "error" in line)]


# ---------------------------------------------------------------- finished and running runs
def test_train_refuses_a_finished_run_then_overwrite_starts_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out)]
    assert _run(base, capsys)[0] == 0
    final = (out / "model_final.pth").read_bytes()
    rc, _, err = _run([*base, "SOLVER.MAX_ITER", "2"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "holds a finished training run" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert (out / "model_final.pth").read_bytes() == final  # not replaced
    assert sorted(losses_of(str(out))) == [1, 2, 3, 4]

    assert _run([*base, "--overwrite", "SOLVER.MAX_ITER", "2"], capsys)[0] == 0
    assert sorted(losses_of(str(out))) == [1, 2]  # the metrics of one run, not a mix
    assert not (out / "model_0000002.pth").exists() or torch.load(out / "model_final.pth")["iteration"] == 2
    assert not (out / LOCK_NAME).exists()  # released


def test_lock_refuses_a_running_run_and_takes_over_a_stale_one(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "since": "x"}))
        with pytest.raises(ConfigError, match=f"in use by another training run .process {sleeper.pid}"):
            OutputLock(str(out)).acquire()
        rc, _, err = _run(["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out)], capsys)
        assert rc == 2 and len(err) == 1 and "in use by another training run" in err[0], err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: its lock is stale and taken over with a log line
    with captured_log() as log:
        assert main(["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2"]) == 0
    assert f"taking over the stale lock {out / LOCK_NAME} (process {sleeper.pid}, no longer running)" in log.text
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------- full disk, partial files, plots
def test_disk_full_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    trainer = FakeDataTrainer(tiny_cfg(str(tmp_path), **{"SOLVER.MAX_ITER": 4}))
    ck = trainer.checkpointer
    ck.save("model_0000002", iteration=2)
    before = (tmp_path / "model_0000002.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"\0" * 4096)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        ck.save("model_0000002", iteration=4)
    msg = str(e.value)
    assert "\n" not in msg and "model_0000002.pth" in msg and "disk is full" in msg and "previous file is kept" in msg
    monkeypatch.setattr(C.torch, "save", real_save)
    assert (tmp_path / "model_0000002.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    assert torch.load(tmp_path / "model_0000002.pth", weights_only=False)["iteration"] == 2


def test_disk_full_during_training_is_one_line(data, tmp_path, capsys, monkeypatch):
    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.torch, "save", full_disk)
    rc, _, err = _run(["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(tmp_path / "r")], capsys)
    assert rc == 2 and len(err) == 1 and "disk is full" in err[0], err
    assert not [n for n in os.listdir(tmp_path / "r") if ".tmp" in n]


def test_stale_temp_files_removed_at_next_start(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2"],
                capsys)[0] == 0
    (out / "model_0000004.pth.tmp4242").write_bytes(b"\0" * 1000)  # a SIGKILLed write
    (out / "last_checkpoint.tmp4242").write_text("x")
    with captured_log() as log:
        assert main(["train", "--resume", "--config-file", data["yaml"], "OUTPUT_DIR", str(out)]) == 0
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert "removed 2 partial file(s) of an interrupted write" in log.text


def test_plots_never_left_empty(tmp_path, monkeypatch):
    import surgdino.visualize as V

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"iter": 1, "total_loss": 1.0}) + "\n")

    def dies_midway(path, out_dir):
        open(os.path.join(out_dir, "total_loss.png"), "wb").close()  # savefig started the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(V, "plot_training_curves", dies_midway)
    assert H.plot_metrics(str(metrics), str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # no 0-byte PNG, no temp folder
    monkeypatch.undo()
    drawn = H.plot_metrics(str(metrics), str(tmp_path))
    assert drawn and all(os.path.getsize(p) > 0 for p in drawn)


# ---------------------------------------------------------------- resume errors
def test_resume_without_readable_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="--resume: no checkpoint in"):
        FakeDataTrainer(tiny_cfg(str(tmp_path / "empty")), resume=True)
    out = tmp_path / "run"
    FakeDataTrainer(tiny_cfg(str(out), **{"SOLVER.MAX_ITER": 4})).train()
    for name in ("model_final.pth",):
        (out / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint"):
        FakeDataTrainer(tiny_cfg(str(out)), resume=True)


def test_resume_with_another_shape_is_one_error_and_keeps_config(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out)]
    assert _run([*base, "SOLVER.MAX_ITER", "2"], capsys)[0] == 0
    config = (out / "config.yaml").read_text()
    # the same run resumed with a 5-class head over a 5-class dataset (so the start-up data checks pass and
    # the checkpoint's 3-class head is what does not fit)
    from surgdino.data.synthetic import generate_synthetic_dataset

    five = generate_synthetic_dataset(str(tmp_path / "five"), num_train=2, num_val=1, num_classes=5, image_size=48,
                                      instances_per_image=(1, 2), progress=False)
    cfg5 = yaml.safe_load(open(data["yaml"]))
    cfg5["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] = 5
    cfg5["DATASETS"]["REGISTER"][0].update(json_file=five["train_json"], image_root=five["train_dir"])
    yaml5 = tmp_path / "five.yaml"
    yaml5.write_text(yaml.safe_dump(cfg5))
    rc, _, err = _run(["train", "--config-file", str(yaml5), "OUTPUT_DIR", str(out), "--resume"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "does not fit the configured model" in err[0] and "head.weight" in err[0] and "config.yaml" in err[0]
    assert (out / "config.yaml").read_text() == config


# ---------------------------------------------------------------- exact resume
class _StopAt(HookBase):
    def __init__(self, at: int, how: str):
        self.at, self.how = at, how

    def after_step(self):
        if self.trainer.iter + 1 == self.at:
            if self.how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), getattr(signal, self.how))


def _stopping(at: int, how: str):
    class T(FakeDataTrainer):
        def build_hooks(self):
            hooks = super().build_hooks()
            return hooks[:1] + [_StopAt(at, how)] + hooks[1:]  # early: the signal arrives mid-iteration

    return T


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "data_time")} for r in rows]


def test_metrics_after_resume_equal_uninterrupted_when_periods_do_not_divide(tmp_path):
    """LOG_PERIOD 3, CHECKPOINT_PERIOD 4, stopped at 6 (after the checkpoint at 4, before the write at 6):
    the resumed run's metrics.jsonl equals the uninterrupted run's (its first write after the resume
    averages iterations 4-6, two of them before the checkpoint... from the checkpoint's writer state)."""
    over = {"SOLVER.MAX_ITER": 12, "SOLVER.LOG_PERIOD": 3, "SOLVER.CHECKPOINT_PERIOD": 4}
    FakeDataTrainer(tiny_cfg(str(tmp_path / "full"), **over)).train()
    with pytest.raises(KeyboardInterrupt):
        _stopping(6, "raise")(tiny_cfg(str(tmp_path / "cut"), **over)).train()
    FakeDataTrainer(tiny_cfg(str(tmp_path / "cut"), **over), resume=True).train()
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["iter"] for r in full] == [3, 6, 9, 12]
    assert cut == full


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_saves_the_current_iteration_and_resume_repeats(tmp_path, sig):
    over = {"SOLVER.MAX_ITER": 10, "SOLVER.LOG_PERIOD": 1, "SOLVER.CHECKPOINT_PERIOD": 4}
    FakeDataTrainer(tiny_cfg(str(tmp_path / "full"), **over)).train()
    cut = tmp_path / "cut"
    with pytest.raises(H.TrainingInterrupted, match=f"stopped by {sig} after iteration 6: saved .*model_0000006.pth"):
        _stopping(6, sig)(tiny_cfg(str(cut), **over)).train()
    assert (cut / "last_checkpoint").read_text() == "model_0000006.pth"
    assert signal.getsignal(getattr(signal, sig)) is not None  # the handlers are put back
    resumed = FakeDataTrainer(tiny_cfg(str(cut), **over), resume=True)
    assert resumed.start_iter == 6
    resumed.train()
    a, b = losses_of(str(tmp_path / "full")), losses_of(str(cut))
    assert sorted(b) == list(range(1, 11))
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=1e-7), it


def test_ctrl_c_with_loader_workers_saves_and_resumes(data, tmp_path, capsys, monkeypatch):
    """Ctrl-C reaches every process of the terminal's group: the data-loading worker ignores it, the trainer
    saves the current iteration and stops with one line; --resume finishes the run."""
    import multiprocessing

    from surgdino.engine.defaults import Trainer

    class CtrlC(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 == 3:
                for p in multiprocessing.active_children():
                    os.kill(p.pid, signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    build = Trainer.build_hooks

    def with_ctrl_c(self):
        hooks = build(self)
        return hooks[:1] + [CtrlC()] + hooks[1:]

    out = tmp_path / "run"
    args = ["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", "1",
            "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "0"]
    monkeypatch.setattr(Trainer, "build_hooks", with_ctrl_c)
    rc, _, err = _run(args, capsys)
    assert rc == 2 and len(err) == 1, err
    assert "stopped by SIGINT after iteration 3" in err[0] and "model_0000003.pth" in err[0] and "--resume" in err[0]
    monkeypatch.setattr(Trainer, "build_hooks", build)
    assert _run([*args, "--resume"], capsys)[0] == 0
    assert sorted(losses_of(str(out))) == [1, 2, 3, 4, 5, 6]


class _ScriptedEval(FakeDataTrainer):
    """Evaluation results by iteration: best at 2, worse at 4."""

    AP = {2: 50.0, 4: 40.0, 6: 45.0}

    @classmethod
    def test(cls, cfg, model):
        return {"segm": {"AP": cls.AP[cls.now]}}

    def build_hooks(self):
        hooks = super().build_hooks()

        class Now(HookBase):
            def before_step(self):
                _ScriptedEval.now = self.trainer.iter + 1

        return [Now()] + hooks


def test_best_model_survives_resume(tmp_path):
    over = {"SOLVER.MAX_ITER": 6, "TEST.EVAL_PERIOD": 2, "SOLVER.CHECKPOINT_PERIOD": 2, "DATASETS.TEST": "['none']"}
    out = tmp_path / "run"

    class Cut(_ScriptedEval):
        def build_hooks(self):
            return super().build_hooks() + [_StopAt(3, "raise")]

    with pytest.raises(KeyboardInterrupt):
        Cut(tiny_cfg(str(out), **over)).train()
    assert torch.load(out / "model_best.pth", weights_only=False)["iteration"] == 2
    resumed = _ScriptedEval(tiny_cfg(str(out), **over), resume=True)
    best = next(h for h in resumed.trainer._hooks if isinstance(h, H.BestCheckpointer))
    assert best.best == 50.0 and best.best_iter == 2
    resumed.train()  # AP 40 at 4 and 45 at 6: both worse than 50
    saved = torch.load(out / "model_best.pth", weights_only=False)
    assert saved["iteration"] == 2 and saved["best_value"] == 50.0


# ---------------------------------------------------------------- eval-only beside the run, printing
def test_eval_only_writes_beside_the_run_and_prints_tables_once(data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--config-file", data["yaml"], "OUTPUT_DIR", str(out)]
    assert _run(base, capsys)[0] == 0
    config = (out / "config.yaml").read_text()
    rc, printed, err = _run([*base, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                             "DATASETS.TEST", "['lost_val']"], capsys)
    assert rc == 0, err
    assert (out / "config.yaml").read_text() == config  # the training run's config is untouched
    evals = [n for n in os.listdir(out) if n.startswith("eval_model_final_")]
    assert len(evals) == 1
    folder = out / evals[0]
    assert (folder / "config.yaml").is_file() and (folder / "inference" / "lost_val" / "results.json").is_file()
    assert "model_final.pth" in (folder / "config.yaml").read_text()
    assert printed.count("AP50") == 1 and printed.count("Per-class segm AP") == 1  # the tables once, at the end


def test_log_line_shows_total_and_main_terms_only():
    from surgdino.engine.writers import ConsoleWriter, main_loss_terms

    scalars = {"total_loss": 9.0, "loss_ce": 1.0, "loss_mask": 2.0, "loss_dice": 3.0, "lr": 0.1,
               **{f"loss_ce_{i}": 0.5 for i in range(9)}, "loss_ce_dn": 0.1, "loss_mask_interm": 0.2}
    assert main_loss_terms(scalars) == ["total_loss", "loss_ce", "loss_dice", "loss_mask"]
    with captured_log() as log:
        ConsoleWriter(0, 10, enable_bar=False).write(5, scalars)
    assert "loss_ce: 1" in log.text and "total_loss: 9" in log.text
    assert "loss_ce_0" not in log.text and "_dn" not in log.text and "_interm" not in log.text


def test_seconds_per_iteration_exclude_evaluation(tmp_path):
    import re
    import time

    class SlowEval(FakeDataTrainer):
        @classmethod
        def test(cls, cfg, model):
            time.sleep(0.5)
            return {"segm": {"AP": 1.0}}

    over = {"SOLVER.MAX_ITER": 4, "TEST.EVAL_PERIOD": 2, "SOLVER.CHECKPOINT_PERIOD": 0, "DATASETS.TEST": "['x']"}
    with captured_log() as log:
        SlowEval(tiny_cfg(str(tmp_path), **over)).train()
    found = re.search(r"trained 4 iterations in ([\d.]+) s: ([\d.]+) s/it training", log.text)
    assert found, log.text
    total, per_it = float(found.group(1)), float(found.group(2))
    assert total >= 1.0 and per_it * 4 < total - 0.9  # the two 0.5 s evaluations are not in s/it
