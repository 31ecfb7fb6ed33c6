"""Engine: optimizer groups and schedule, corrupt checkpoints, weights-only loading, non-finite losses,
gradient accumulation (the kill-and-resume test with a real MaskDINO is in test_engine_cli.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_engine_helpers import EngineTestNet, FakeDataTrainer, captured_log, losses_of, tiny_cfg

from surgdino.engine.checkpointer import Checkpointer, load_weights
from surgdino.engine.optimizer import WarmupSchedule, build_lr_scheduler, build_optimizer, scale_config
from surgdino.engine.trainer import NonFiniteLossError
from surgdino.errors import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))


def _train(out_dir, resume=False, **over):
    trainer = FakeDataTrainer(tiny_cfg(str(out_dir), **over), resume=resume)
    trainer.train()
    return trainer


def test_param_groups_decay_and_backbone_lr(tmp_path):
    cfg = tiny_cfg(str(tmp_path), **{"SOLVER.BACKBONE_MULTIPLIER": 0.1, "SOLVER.WEIGHT_DECAY": 0.05})
    model = EngineTestNet()
    opt = build_optimizer(cfg, model)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert isinstance(opt, torch.optim.AdamW)
    assert by_param[id(model.backbone[0].weight)]["lr"] == pytest.approx(0.001)
    assert by_param[id(model.backbone[0].weight)]["weight_decay"] == 0.05
    assert by_param[id(model.backbone[1].weight)]["weight_decay"] == 0.0  # norm
    assert by_param[id(model.embed.weight)]["weight_decay"] == 0.0  # embedding
    assert by_param[id(model.head.bias)]["weight_decay"] == 0.0  # bias
    assert by_param[id(model.head.weight)]["weight_decay"] == 0.05
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_schedule_warmup_then_steps(tmp_path):
    s = WarmupSchedule(max_iter=100, steps=[50, 80], gamma=0.1, warmup_iters=10, warmup_factor=0.01)
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.01 * 0.5 + 0.5)
    assert s(10) == 1.0 and s(49) == 1.0
    assert s(50) == pytest.approx(0.1) and s(80) == pytest.approx(0.01)
    cfg = tiny_cfg(str(tmp_path), **{"SOLVER.WARMUP_ITERS": 0, "SOLVER.STEPS": [2]})
    opt = build_optimizer(cfg, EngineTestNet())
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(3):
        lrs.append(max(g["lr"] for g in opt.param_groups))
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.001])


def test_scale_config_linear_rule(tmp_path):
    cfg = tiny_cfg(str(tmp_path), **{"SOLVER.REFERENCE_IMS_PER_BATCH": 16, "SOLVER.IMS_PER_BATCH": 4,
                                      "SOLVER.MAX_ITER": 100, "SOLVER.STEPS": [80]})
    out = scale_config(cfg, 1)
    assert out.SOLVER.BASE_LR == pytest.approx(0.0025)
    assert out.SOLVER.MAX_ITER == 400 and out.SOLVER.STEPS == [320]
    assert scale_config(tiny_cfg(str(tmp_path)), 1).SOLVER.MAX_ITER == 12  # off by default


def test_corrupt_checkpoint_errors_and_resume_falls_back(tmp_path):
    out = tmp_path / "run"
    _train(out, **{"SOLVER.MAX_ITER": 9})
    shutil.copy(out / "model_0000004.pth", out / "good.pth")
    (out / "model_final.pth").unlink()
    with open(out / "model_0000008.pth", "r+b") as f:  # truncated, as by a full disk
        f.truncate(os.path.getsize(out / "model_0000008.pth") // 2)
    (out / "last_checkpoint").write_text("model_0000008.pth")
    with pytest.raises(CheckpointError, match="model_0000008.pth.*corrupt or truncated"):
        load_weights(EngineTestNet(), str(out / "model_0000008.pth"))
    ck = Checkpointer(EngineTestNet(), str(out))
    state = ck.resume()
    assert state is not None and state["iteration"] == 4 and state["path"].endswith("model_0000004.pth")


def test_weights_only_skips_shape_mismatch(tmp_path):
    src = EngineTestNet(num_classes=3)
    torch.save({"model": src.state_dict(), "thing_classes": ["a", "b", "c"]}, tmp_path / "w.pth")
    dst = EngineTestNet(num_classes=5)  # a bigger class head over a smaller checkpoint
    head_before = dst.head.weight.clone()
    with captured_log() as caplog:
        extra = load_weights(dst, str(tmp_path / "w.pth"))
    assert extra["thing_classes"] == ["a", "b", "c"]
    assert torch.equal(dst.backbone[0].weight, src.backbone[0].weight)
    assert torch.equal(dst.head.weight, head_before)
    assert "shape mismatch" in caplog.text and "head.weight" in caplog.text
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(dst, str(tmp_path / "missing.pth"))


def test_nonfinite_loss_skips_steps_then_stops(tmp_path):
    trainer = FakeDataTrainer(tiny_cfg(str(tmp_path), **{"SOLVER.MAX_NONFINITE_STEPS": 3}))
    model = trainer.trainer.model
    model.nan_at = 3  # forward 3 onwards: NaN box loss
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="loss_box.*3 steps in a row"):
        trainer.train()
    assert trainer.trainer.iter == 4  # steps 3, 4, 5 (index 2..4) were skipped; the third one stops
    after_two = model.state_dict()
    assert any(not torch.equal(before[k], after_two[k]) for k in before)  # steps 1-2 did update
    assert all(torch.isfinite(v).all() for v in after_two.values())


def test_gradient_accumulation_equals_large_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_TEST_NO_NOISE", "1")
    _train(tmp_path / "big", **{"SOLVER.MAX_ITER": 5})
    _train(tmp_path / "acc", **{"SOLVER.MAX_ITER": 5, "SOLVER.ACCUMULATION_STEPS": 2})
    big, acc = losses_of(str(tmp_path / "big")), losses_of(str(tmp_path / "acc"))
    for it in range(1, 6):
        assert acc[it] == pytest.approx(big[it], rel=1e-5, abs=1e-6)


def test_amp_turned_off_on_cpu_with_reason(tmp_path):
    trainer = FakeDataTrainer(tiny_cfg(str(tmp_path), **{"SOLVER.AMP.ENABLED": True}))
    assert trainer.trainer.amp_dtype is None and trainer.trainer.scaler is None


def test_device_resolution_is_one_function_and_never_falls_back():
    """MODEL.DEVICE, check-backbone --device and the SurgeryCLIP builder's args.device resolve alike; a device
    that is not there is an error naming the setting, not a silent CPU run."""
    from surgdino.device import resolve_device
    from surgdino.engine.defaults import resolve_device as from_config
    from surgdino.errors import ConfigError
    from surgdino.modeling.backbone.cli import _device as check_backbone_device
    from surgdino.modeling.backbone.surgeryclip_backbone import _resolve_device as surgeryclip_device

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last device (cuda:0 without CUDA)
    for resolve, key in [(lambda d: resolve_device(d), "MODEL.DEVICE"), (check_backbone_device, "--device"),
                         (surgeryclip_device, "args.device")]:
        assert resolve("cpu") == torch.device("cpu")
        assert resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
        with pytest.raises(ConfigError, match=key):
            resolve(missing)
        with pytest.raises(ConfigError, match="not a device"):
            resolve("gpu0")
    cfg = tiny_cfg("/tmp/unused", **{"MODEL.DEVICE": missing})
    with pytest.raises(ConfigError, match="MODEL.DEVICE"):
        from_config(cfg)
