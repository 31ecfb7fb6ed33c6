"""Model EMA: the update's closed form (with the ramp), buffers, swapping for evaluation, skipped and
accumulated steps, checkpoint/resume equality, evaluation and weight loading with the EMA, DECAY checks."""

from __future__ import annotations

import pytest
import torch
from test_engine_helpers import EngineTestNet, FakeDataTrainer, captured_log, tiny_cfg
from torch import nn

from surgdino.engine import hooks as H
from surgdino.engine.checkpointer import load_weights
from surgdino.engine.ema import ModelEMA, effective_decay
from surgdino.engine.trainer import HookBase, NonFiniteLossError
from surgdino.errors import ConfigError

EMA_ON = {"MODEL_EMA.ENABLED": True, "MODEL_EMA.DECAY": 0.9}


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + [model[1].running_mean, model[1].running_var]:
            t.fill_(value)
        model[1].num_batches_tracked.fill_(int(value))


def test_effective_decay_ramp():
    assert effective_decay(0.999, 0) == pytest.approx(0.1)
    assert effective_decay(0.999, 1) == pytest.approx(2 / 11)
    assert effective_decay(0.999, 90) == pytest.approx(91 / 100)
    assert effective_decay(0.5, 7) == pytest.approx(8 / 17)
    assert effective_decay(0.5, 8) == 0.5 and effective_decay(0.0, 3) == 0.0


def test_update_equals_closed_form_and_buffers_follow():
    model = _small_net()
    _fill(model, 1.0)
    ema = ModelEMA(model, decay=0.5)
    assert all(v.dtype == torch.float32 for k, v in ema.state.items() if k in ema.float_keys)
    assert ema.state["1.num_batches_tracked"].dtype == torch.int64
    expected = 1.0
    for n, w in enumerate([3.0, -2.0, 5.0, 0.5, 4.0, 4.0, -1.0, 2.0, 7.0, 1.0, -3.0]):  # crosses the ramp at n = 8
        _fill(model, w)
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
        for k in ema.float_keys:  # weights, biases and the BatchNorm running statistics
            torch.testing.assert_close(ema.state[k], torch.full_like(ema.state[k], expected), rtol=0, atol=1e-6)
        assert int(ema.state["1.num_batches_tracked"]) == int(w)  # non-float buffers are copied
    assert ema.updates == 11
    # the model's tensors are not aliased: changing the model does not change the average
    _fill(model, 100.0)
    assert float(ema.state["0.weight"][0, 0]) == pytest.approx(expected, abs=1e-6)


def test_applied_swaps_in_ema_and_restores_training_weights_exactly():
    torch.manual_seed(0)
    model = _small_net()
    ema = ModelEMA(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 3)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(before["0.weight"], ema.state["0.weight"])
    with ema.applied(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.state[k].to(v.dtype)), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(RuntimeError, match="boom"), ema.applied(model):
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_state_dict_round_trip():
    model = _small_net()
    ema = ModelEMA(model, decay=0.9)
    _fill(model, 2.0)
    ema.update(model)
    other = ModelEMA(_small_net(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for k in ema.state:
        assert torch.equal(other.state[k], ema.state[k]), k


def test_trainer_updates_once_per_taken_step(tmp_path):
    acc = FakeDataTrainer(tiny_cfg(str(tmp_path / "acc"), **EMA_ON, **{"SOLVER.MAX_ITER": 3,
                                                                        "SOLVER.ACCUMULATION_STEPS": 2}))
    acc.train()
    assert acc.ema.updates == 3  # one per iteration, not per micro-batch

    skip = FakeDataTrainer(tiny_cfg(str(tmp_path / "nan"), **EMA_ON, **{"SOLVER.MAX_NONFINITE_STEPS": 3}))
    skip.trainer.model.nan_at = 3  # forward 3 onwards: NaN; steps 3, 4, 5 are skipped, the third stops
    with pytest.raises(NonFiniteLossError):
        skip.train()
    assert skip.ema.updates == 2
    assert all(torch.isfinite(v).all() for v in skip.ema.state.values())


class _StopAt6(HookBase):
    def after_step(self):  # after the checkpoint at 4, like a killed run
        if self.trainer.iter + 1 == 6:
            raise KeyboardInterrupt


class _InterruptedTrainer(FakeDataTrainer):
    def build_hooks(self):
        return super().build_hooks() + [_StopAt6()]


def test_resume_restores_ema_like_uninterrupted_run(tmp_path):
    over = {**EMA_ON, "SOLVER.MAX_ITER": 8, "SOLVER.CHECKPOINT_PERIOD": 4}
    full = FakeDataTrainer(tiny_cfg(str(tmp_path / "full"), **over))
    full.train()
    with pytest.raises(KeyboardInterrupt):
        _InterruptedTrainer(tiny_cfg(str(tmp_path / "cut"), **over)).train()
    ck4 = torch.load(tmp_path / "cut" / "model_0000004.pth", weights_only=False)
    assert ck4["ema"]["updates"] == 4
    resumed = FakeDataTrainer(tiny_cfg(str(tmp_path / "cut"), **over), resume=True)
    assert resumed.start_iter == 4 and resumed.ema.updates == 4
    resumed.train()
    assert resumed.ema.updates == full.ema.updates == 8
    a = torch.load(tmp_path / "full" / "model_final.pth", weights_only=False)
    b = torch.load(tmp_path / "cut" / "model_final.pth", weights_only=False)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 8
    moved = False
    for k, v in a["ema"]["model"].items():
        torch.testing.assert_close(b["ema"]["model"][k], v, rtol=1e-6, atol=1e-6, msg=k)
        moved |= not torch.equal(v, a["model"][k])
    assert moved  # the average is not the training weights


class _EvalTrainer(FakeDataTrainer):
    """The default hooks with an evaluation that records the weights it sees; AP falls with each eval,
    so the first evaluation writes model_best.pth."""

    seen: list[torch.Tensor] = []

    @classmethod
    def test(cls, cfg, model):
        cls.seen.append(model.head.weight.detach().clone())
        return {"segm": {"AP": 100.0 - len(cls.seen)}}


def test_evaluation_uses_ema_and_checkpoints_keep_both(tmp_path):
    _EvalTrainer.seen = []
    cfg = tiny_cfg(str(tmp_path), **EMA_ON, **{"SOLVER.MAX_ITER": 6, "TEST.EVAL_PERIOD": 3,
                                               "SOLVER.CHECKPOINT_PERIOD": 0, "DATASETS.TEST": "['none']"})
    trainer = _EvalTrainer(cfg)
    assert any(isinstance(h, H.EvalHook) for h in trainer.trainer._hooks)
    with captured_log() as log:
        trainer.train()
    assert len(_EvalTrainer.seen) == 2  # iterations 3 and 6
    assert log.text.count("evaluating with the EMA weights") == 1
    model = trainer.trainer.model
    assert torch.equal(_EvalTrainer.seen[-1], trainer.ema.state["head.weight"])  # the final evaluation
    assert not torch.equal(model.head.weight, trainer.ema.state["head.weight"])  # training weights are back
    best = torch.load(tmp_path / "model_best.pth", weights_only=False)
    assert best["iteration"] == 3 and best["ema"]["updates"] == 3
    assert torch.equal(best["ema"]["model"]["head.weight"], _EvalTrainer.seen[0])
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert torch.equal(final["model"]["head.weight"], model.head.weight)
    assert torch.equal(final["ema"]["model"]["head.weight"], trainer.ema.state["head.weight"])

    # eval-only and predict load the weights that were evaluated
    from surgdino.engine.predictor import Predictor

    with captured_log() as log:
        pred = Predictor(cfg.merge({"MODEL.WEIGHTS": str(tmp_path / "model_final.pth")}))
    assert torch.equal(pred.model.head.weight, trainer.ema.state["head.weight"])
    assert log.text.count("loading its EMA weights") == 1


def test_load_weights_prefers_ema(tmp_path):
    a, b = EngineTestNet(), EngineTestNet()
    path = tmp_path / "both.pth"
    torch.save({"model": a.state_dict(), "ema": ModelEMA(b).state_dict(), "thing_classes": ["x"]}, path)
    dst = EngineTestNet()
    extra = load_weights(dst, str(path))
    assert torch.equal(dst.head.weight, b.head.weight)
    assert "ema" not in extra and extra["thing_classes"] == ["x"]
    load_weights(dst, str(path), prefer_ema=False)
    assert torch.equal(dst.head.weight, a.head.weight)


def test_ema_off_by_default_writes_no_ema(tmp_path):
    trainer = FakeDataTrainer(tiny_cfg(str(tmp_path), **{"SOLVER.MAX_ITER": 2}))
    trainer.train()
    assert trainer.ema is None and not any(isinstance(h, H.EMAHook) for h in trainer.trainer._hooks)
    assert "ema" not in torch.load(tmp_path / "model_final.pth", weights_only=False)


@pytest.mark.parametrize("decay", ["1.0", "-0.1", "1.5"])
def test_bad_decay_is_a_config_error(tmp_path, decay):
    with pytest.raises(ConfigError, match=r"MODEL_EMA\.DECAY = .* must be in \[0, 1\)"):
        tiny_cfg(str(tmp_path), **{"MODEL_EMA.DECAY": decay})
