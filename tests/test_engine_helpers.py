"""A tiny real model and an in-memory resumable data stream for the engine tests (plus their own checks).

``EngineTestNet`` is registered in META_ARCH_REGISTRY under a test-only name: a conv "backbone",
a norm, an embedding and a linear head that regresses the first instance's box and class. Its
training forward draws random noise, so resume tests also check the RNG state.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from surgdino import comm
from surgdino.engine.defaults import Trainer
from surgdino.registry import META_ARCH_REGISTRY

NAME = "EngineTestNet"


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def captured_log():
    """Messages of the ``surgdino`` loggers, collected by a handler of our own on the package logger: each
    record exactly once whatever pytest's ``caplog`` does (pytest 9.2 captured every record twice when the
    package logger propagated to its handler). Use ``.text`` / ``.lines``."""
    root = logging.getLogger("surgdino")
    handler = _Collect()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


class EngineTestNet(nn.Module):
    def __init__(self, *, num_classes: int = 3, width: int = 8, nan_at: int = -1, noise: float = 0.01):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GroupNorm(2, width), nn.ReLU())
        self.neck = nn.Linear(width * 64, 32)
        self.embed = nn.Embedding(1, 32)
        self.head = nn.Linear(32, 4 + num_classes)
        self.num_classes = num_classes
        self.nan_at = nan_at  # forward count from which the loss is NaN (tests of the skip)
        self.calls = 0
        self.noise = noise

    @classmethod
    def from_config(cls, cfg):
        noise = 0.0 if os.environ.get("ENGINE_TEST_NO_NOISE") else 0.01
        return dict(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, noise=noise)

    def _features(self, batch):
        device = self.head.weight.device
        imgs = [F.interpolate(d["image"].to(device).float()[None] / 255.0, size=(16, 16), mode="bilinear",
                              align_corners=False) for d in batch]
        x = self.backbone(torch.cat(imgs))  # [B, C, 8, 8]
        x = self.neck(x.flatten(1)).relu() + self.embed.weight  # [B, 32]
        if self.training and self.noise:
            x = x + self.noise * torch.randn_like(x)
        return self.head(x)  # [B, 4 + K]

    def forward(self, batch):
        out = self._features(batch)
        boxes = out[:, :4].sigmoid()  # [B, 4] normalised xyxy-ish
        if self.training:
            self.calls += 1
            l_box, l_ce = [], []
            for i, d in enumerate(batch):
                inst = d["instances"]
                h, w = d["image"].shape[-2:]
                if len(inst["boxes"]) == 0:
                    continue
                tgt = inst["boxes"][0].float() / torch.tensor([w, h, w, h], dtype=torch.float32)
                l_box.append(F.l1_loss(boxes[i], tgt.to(boxes.device), reduction="sum"))
                l_ce.append(F.cross_entropy(out[i, 4:][None], inst["classes"][:1].to(out.device)))
            zero = out.sum() * 0
            loss_box = torch.stack(l_box).mean() if l_box else zero
            loss_ce = torch.stack(l_ce).mean() if l_ce else zero
            if 0 <= self.nan_at <= self.calls:
                loss_box = loss_box * float("nan")
            return {"loss_box": loss_box, "loss_ce": loss_ce}
        results = []
        probs = out[:, 4:].softmax(-1)
        for i, d in enumerate(batch):
            h, w = int(d["height"]), int(d["width"])
            b = boxes[i] * torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
            x0, x1 = sorted([float(b[0]), float(b[2])])
            y0, y1 = sorted([float(b[1]), float(b[3])])
            mask = torch.zeros(1, h, w, dtype=torch.bool)
            mask[0, int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
            score, label = probs[i].max(0)
            results.append({"boxes": torch.tensor([[x0, y0, x1, y1]]), "masks": mask,
                            "scores": score[None].detach().cpu(), "labels": label[None].cpu()})
        return results


if NAME not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(NAME)(EngineTestNet)


def fake_sample(seed: int, position: int, num_classes: int = 3) -> dict:
    """One deterministic training sample (mapper-output format) at a position of the global stream."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + position)
    h, w = 24, 32
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    x0, y0 = int(torch.randint(0, w // 2, (1,), generator=g)), int(torch.randint(0, h // 2, (1,), generator=g))
    x1, y1 = x0 + 4 + int(torch.randint(0, w // 2 - 4, (1,), generator=g)), y0 + 4 + int(torch.randint(0, h // 2 - 4, (1,), generator=g))
    image[:, y0:y1, x0:x1] = 255  # the object is visible
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    masks[0, y0:y1, x0:x1] = True
    cls = int(torch.randint(0, num_classes, (1,), generator=g))
    return {"image": image, "height": h, "width": w, "image_id": position, "file_name": "",
            "instances": {"boxes": torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), "masks": masks,
                          "classes": torch.tensor([cls])}}


def fake_stream(cfg, seed: int, start_iter: int):
    """Micro-batches of this rank's shard of a global stream (like the real resumable loader).

    Positions are contiguous per micro-batch, so one batch of 4, two accumulated micro-batches of
    2 and two ranks with 2 each see the same four samples at an iteration."""
    world, rank = comm.get_world_size(), comm.get_rank()
    per = cfg.SOLVER.IMS_PER_BATCH // (world * cfg.SOLVER.ACCUMULATION_STEPS)
    b = start_iter
    while True:
        yield [fake_sample(seed, (b * world + rank) * per + j) for j in range(per)]
        b += 1


class FakeDataTrainer(Trainer):
    """The default trainer with the in-memory stream and no evaluation datasets."""

    @classmethod
    def build_train_loader(cls, cfg, *, seed, start_iter):
        return fake_stream(cfg, seed, start_iter * cfg.SOLVER.ACCUMULATION_STEPS)


def tiny_cfg(out_dir: str, **over):
    from surgdino.config import load_config

    opts = {"MODEL.META_ARCHITECTURE": NAME, "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "MODEL.DEVICE": "cpu",
            "OUTPUT_DIR": out_dir, "SEED": 3, "SOLVER.IMS_PER_BATCH": 4, "SOLVER.BASE_LR": 0.01,
            "SOLVER.MAX_ITER": 12, "SOLVER.STEPS": [8], "SOLVER.WARMUP_ITERS": 2, "SOLVER.CHECKPOINT_PERIOD": 4,
            "SOLVER.LOG_PERIOD": 1, "DATALOADER.NUM_WORKERS": 0, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0}
    opts.update(over)
    flat = [str(x) for kv in opts.items() for x in kv]
    return load_config(None, flat)


# A tiny real MaskDINO (atto ConvNeXt, 1 encoder and 1 decoder layer, few queries and points): seconds per
# run on a CPU, for the command-line tests.
TINY_MASKDINO = {
    "META_ARCHITECTURE": "MaskDINO",
    "BACKBONE": {"NAME": "convnext_atto"},
    "CONVNEXT": {"DROP_PATH_RATE": 0.1},  # stochastic: resume must restore the RNG
    "SEM_SEG_HEAD": {"CONVS_DIM": 32, "MASK_DIM": 32, "NUM_FEATURE_LEVELS": 3, "TOTAL_NUM_FEATURE_LEVELS": 3,
                     "TRANSFORMER_ENC_LAYERS": 1, "DIM_FEEDFORWARD": 64,
                     "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 4},
    "MaskDINO": {"HIDDEN_DIM": 32, "NHEADS": 4, "DIM_FEEDFORWARD": 64, "DEC_LAYERS": 1, "NUM_OBJECT_QUERIES": 8,
                 "FIRST_SELECTED_QUERIES": 16, "NUM_GUIDING_TOKENS": 4, "TI_LAYERS": 1, "TRAIN_NUM_POINTS": 64,
                 "DN_NUM": 6},
}


def tiny_maskdino_model_cfg(num_classes: int = 3) -> dict:
    """The ``MODEL`` section of a tiny MaskDINO config (a fresh nested dict)."""
    import copy

    model = copy.deepcopy(TINY_MASKDINO)
    model["SEM_SEG_HEAD"]["NUM_CLASSES"] = num_classes
    model["DEVICE"] = "cpu"
    return model


def losses_of(out_dir: str) -> dict[int, float]:
    import json

    out = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "total_loss" in row:
                out[row["iter"]] = row["total_loss"]
    return out


# ---------------------------------------------------------------------------- checks of the helpers
def test_fake_stream_resumes_at_position(tmp_path):
    cfg = tiny_cfg(str(tmp_path))
    full = fake_stream(cfg, 1, 0)
    batches = [next(full) for _ in range(5)]
    later = next(fake_stream(cfg, 1, 3))
    assert torch.equal(batches[3][0]["image"], later[0]["image"])


def test_engine_test_net_loss_falls(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(str(tmp_path))
    model = EngineTestNet(num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    stream = fake_stream(cfg, 0, 0)
    fixed = next(stream)
    first = None
    for _ in range(40):
        loss = sum(model(fixed).values())
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def ddp_train_main(out_dir: str, max_iter: int) -> None:
    """Run in each spawned process: train, then save this rank's final parameters for comparison."""
    os.environ["ENGINE_TEST_NO_NOISE"] = "1"
    cfg = tiny_cfg(out_dir, **{"SOLVER.MAX_ITER": max_iter})
    trainer = FakeDataTrainer(cfg)
    trainer.train()
    from surgdino.engine.checkpointer import unwrap

    state = {k: v.detach().clone() for k, v in unwrap(trainer.trainer.model).state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"params_rank{comm.get_rank()}.pt"))
