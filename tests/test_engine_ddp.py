"""Two CPU processes (gloo) train like one process with the same total batch."""

from __future__ import annotations

import os

import pytest
import torch
from test_engine_helpers import ddp_train_main, losses_of

from surgdino.engine.launch import launch


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
