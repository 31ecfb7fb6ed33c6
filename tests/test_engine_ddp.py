"""Two CPU processes (gloo) train like one process with the same total batch; SIGTERM to the launcher
reaches both, which agree on one checkpoint and stop."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_engine_helpers import ddp_train_main, losses_of

from surgdino import comm
from surgdino.engine.launch import launch
from surgdino.errors import SurgDinoError


def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_NO_NOISE", "1")
    one, two = tmp_path / "one", tmp_path / "two"
    ddp_train_main(str(one), 6)
    launch(ddp_train_main, 2, device="cpu", args=(str(two), 6))

    p0 = torch.load(two / "params_rank0.pt")
    p1 = torch.load(two / "params_rank1.pt")
    ref = torch.load(one / "params_rank0.pt")
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
        assert torch.allclose(p0[k], ref[k], atol=1e-5), f"{k} differs from the 1-process run"
    a, b = losses_of(str(one)), losses_of(str(two))
    assert sorted(b) == list(range(1, 7))
    for it in a:
        assert b[it] == pytest.approx(a[it], rel=1e-5, abs=1e-6)
    # only rank 0 wrote files: one metrics file, one checkpoint set
    assert not any(name.startswith("log.txt.") for name in os.listdir(two))


def ddp_sigterm_main(out_dir: str) -> None:
    """Rank 0 sends SIGTERM to the launcher after iteration 3: the launcher forwards it to both processes."""
    from test_engine_helpers import FakeDataTrainer, tiny_cfg

    from surgdino.engine.trainer import HookBase

    class Term(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 == 3 and comm.get_rank() == 0:
                os.kill(os.getppid(), signal.SIGTERM)

    class T(FakeDataTrainer):
        def build_hooks(self):
            return [Term()] + super().build_hooks()

    T(tiny_cfg(out_dir, **{"SOLVER.MAX_ITER": 50, "SOLVER.CHECKPOINT_PERIOD": 0})).train()


def test_sigterm_to_the_launcher_saves_one_checkpoint_and_stops(tmp_path):
    with pytest.raises(SurgDinoError, match="stopped with the error printed above"):
        launch(ddp_sigterm_main, 2, device="cpu", args=(str(tmp_path),))
    saved = sorted(n for n in os.listdir(tmp_path) if n.startswith("model_"))
    assert len(saved) == 1 and not (tmp_path / "model_final.pth").exists(), saved
    it = torch.load(tmp_path / saved[0], weights_only=False)["iteration"]
    assert 3 <= it < 50 and (tmp_path / "last_checkpoint").read_text() == saved[0]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
