"""Training health on dense trays: the demo-sized model on 20-30 instruments per image, through our engine.

Generates synthetic trays (``surgdino data synth``'s generator: 384 px, 20-30 instruments, 18 classes),
writes the config a new user gets from ``surgdino config init --preset demo`` for them, trains it with the
library's ``Trainer`` and, every ``--eval-period`` iterations, logs on the held-out split:

* the last layer's mask (BCE) and dice losses, weighted, averaged since the previous evaluation;
* mask-box agreement: per detection with a non-empty mask, the share of its mask's area inside its own
  predicted box (mean over detections);
* the share of empty masks among the detections (top ``TEST.DETECTIONS_PER_IMAGE`` query-class pairs,
  empty masks kept for this count);
* mask AP50 and box AP50 (COCO, %);
* process CPU minutes of training so far (evaluation excluded), the figure the README quotes.

    python benchmarks/dense_trays.py --threads 1 --iters 1200 --eval-period 200   # the README's curve
    python benchmarks/dense_trays.py --iters 20 --eval-period 10 --num-train 8 --num-val 2   # smoke run
    python benchmarks/dense_trays.py --work-dir W --iters 2400 --resume   # extend a run in W
    python benchmarks/dense_trays.py --work-dir W --iters 8000 --resume --from-iter 1200   # a longer schedule

``--resume`` continues from W's last checkpoint with the schedule of the new ``--iters`` (the learning rate
drops at 86% of it). A run whose drop has already happened is extended from an earlier checkpoint with
``--from-iter N``: its first N iterations are then exactly those of the longer schedule (same warmup, same
data order), so the curve is that of one run of ``--iters``. Rows and CPU minutes continue from
``W/rows.json``.

Timings on a shared machine vary; process CPU time (``time.process_time``) counts the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from surgdino.engine.checkpointer import atomic_write
from surgdino.engine.defaults import Trainer
from surgdino.engine.inference import evaluate


def health(outputs: list[dict]) -> dict[str, float]:
    """Mask-box agreement and empty-mask share of per-image results (``masks``, ``boxes``; empty masks kept)."""
    inside_shares, empty, total = [], 0, 0
    for out in outputs:
        masks, boxes = out["masks"], out["boxes"]  # [K, H, W] bool, [K, 4] xyxy pixels
        total += int(masks.shape[0])
        if not masks.shape[0]:
            continue
        h, w = masks.shape[-2:]
        area = masks.flatten(1).sum(1).float()
        empty += int((area == 0).sum())
        ys = torch.arange(h, dtype=torch.float32)[None, :, None] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, None, :] + 0.5
        b = boxes.float()[:, :, None, None]
        in_box = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])  # [K, H, W]
        inside = (masks & in_box).flatten(1).sum(1).float()
        nonempty = area > 0
        inside_shares += (inside[nonempty] / area[nonempty]).tolist()
    return {"mask_in_box": sum(inside_shares) / len(inside_shares) if inside_shares else float("nan"),
            "empty_masks": empty / total if total else float("nan"), "detections": float(total)}


class HealthTrainer(Trainer):
    """The engine's trainer; each periodic evaluation also records the health figures in ``rows``."""

    def __init__(self, cfg, *, resume: bool = False, rows: list[dict], rows_path: str | None = None):
        self.rows, self.rows_path, self.cpu_eval = rows, rows_path, 0.0
        super().__init__(cfg, resume=resume)
        if resume and rows_path and os.path.isfile(rows_path):
            with open(rows_path) as f:
                self.rows += [r for r in json.load(f)["rows"] if r["iter"] <= self.start_iter]
        self.last_iter = self.start_iter
        self.cpu_before = self.rows[-1]["cpu_min"] if self.rows else 0.0  # CPU minutes of the resumed iterations
        self.cpu0 = time.process_time()

    def test(self, cfg, model):  # type: ignore[override]
        c0 = time.process_time()
        outputs: list[dict] = []
        post = model.postprocessor
        keep = post.keep_empty_masks
        post.keep_empty_masks = True  # count the empty masks; they score 0 and rank last in AP

        def recording(*args, **kwargs):
            out = type(post).__call__(post, *args, **kwargs)
            outputs.append({k: v.cpu() for k, v in out.items()})
            return out

        model.postprocessor = recording
        try:
            results = evaluate(cfg, model)
        finally:
            model.postprocessor = post
            post.keep_empty_masks = keep
        done = self.trainer.iter + 1
        losses = self.trainer.storage.mean_since(self.last_iter)
        self.last_iter = done
        self.cpu_eval += time.process_time() - c0
        row = {"iter": done, "cpu_min": self.cpu_before + (time.process_time() - self.cpu0 - self.cpu_eval) / 60,
               "loss_mask": losses.get("loss_mask", float("nan")), "loss_dice": losses.get("loss_dice", float("nan")),
               **health(outputs),
               "mask_AP50": float(results.get("segm", {}).get("AP50", float("nan"))),
               "box_AP50": float(results.get("bbox", {}).get("AP50", float("nan")))}
        self.rows.append(row)
        if self.rows_path:
            atomic_write(self.rows_path, lambda f: json.dump({"rows": self.rows}, f, indent=2), mode="w")
        print(_format(row), flush=True)
        return results


HEADER = (f"{'iter':>6} {'CPU min':>8} {'mask':>6} {'dice':>6} {'in box':>7} {'empty':>6} {'dets':>6} "
          f"{'mask AP50 (%)':>13} {'box AP50 (%)':>12}")


def _format(r: dict) -> str:
    return (f"{r['iter']:>6} {r['cpu_min']:>8.1f} {r['loss_mask']:>6.3f} {r['loss_dice']:>6.3f} "
            f"{r['mask_in_box']:>7.2f} {r['empty_masks']:>6.2f} {r['detections']:>6.0f} "
            f"{r['mask_AP50']:>13.1f} {r['box_AP50']:>12.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=1200, help="training iterations (default 1200)")
    p.add_argument("--eval-period", type=int, default=200, help="iterations between health evaluations")
    p.add_argument("--batch", type=int, default=4, help="images per iteration (default 4, the demo's)")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=30)
    p.add_argument("--num-classes", type=int, default=18)
    p.add_argument("--size", type=int, default=384, help="tray image size (px)")
    p.add_argument("--instances", type=int, nargs=2, default=[20, 30], metavar=("MIN", "MAX"))
    p.add_argument("--field-cm", type=float, default=None, help="tray width in view (cm; default the generator's)")
    p.add_argument("--preset", default="demo", help="config init preset (default demo)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--work-dir", default=None, help="where data and outputs go (default: a temporary folder)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir up to --iters")
    p.add_argument("--from-iter", type=int, default=None, metavar="N",
                   help="with --resume: continue from the run's checkpoint at iteration N (e.g. the last before its "
                        "learning-rate drop) instead of its last one")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. MODEL.MaskDINO.DN_NUM 60")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from surgdino.config import load_config
    from surgdino.config.core import merge_opts
    from surgdino.config.init import init_config
    from surgdino.config.validate import validate
    from surgdino.data.synthetic import generate_synthetic_dataset
    from surgdino.engine.defaults import default_setup, register_datasets

    work = args.work_dir or tempfile.mkdtemp(prefix="surgdino_dense_")
    data = os.path.join(work, "data")
    ann = os.path.join(data, "annotations")
    if not os.path.isfile(os.path.join(ann, "instances_val.json")):
        extra = {"field_cm": args.field_cm} if args.field_cm else {}
        generate_synthetic_dataset(data, num_train=args.num_train, num_val=args.num_val, num_classes=args.num_classes,
                                   image_size=args.size, seed=args.seed, instances_per_image=tuple(args.instances),
                                   progress=False, **extra)
    yaml_path = os.path.join(work, "dense.yaml")
    init_config(os.path.join(ann, "instances_train.json"), yaml_path, val_json=os.path.join(ann, "instances_val.json"),
                preset=args.preset, force=True)
    cfg = load_config(yaml_path).merge({
        "OUTPUT_DIR": os.path.join(work, "output"), "SOLVER.MAX_ITER": args.iters,
        "SOLVER.STEPS": [int(args.iters * 0.86)], "SOLVER.IMS_PER_BATCH": args.batch,
        "TEST.EVAL_PERIOD": args.eval_period, "SOLVER.CHECKPOINT_PERIOD": args.eval_period,
        "SOLVER.LOG_PERIOD": max(1, min(50, args.eval_period)), "SEED": args.seed, "MODEL.DEVICE": "cpu",
    }, source="benchmarks/dense_trays.py")
    cfg = merge_opts(cfg, args.opts)
    validate(cfg)

    if args.from_iter is not None:
        if not args.resume:
            p.error("--from-iter needs --resume")
        name = f"model_{args.from_iter:07d}.pth"
        if not os.path.isfile(os.path.join(cfg.OUTPUT_DIR, name)):
            p.error(f"--from-iter {args.from_iter}: no {name} in {cfg.OUTPUT_DIR}")
        atomic_write(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), lambda f: f.write(name), mode="w")

    rows: list[dict] = []
    default_setup(cfg, tag="train", save=not args.resume)
    register_datasets(cfg)
    print(HEADER, flush=True)
    HealthTrainer(cfg, resume=args.resume, rows=rows, rows_path=os.path.join(work, "rows.json")).train()

    print()
    print(f"dense trays: {args.num_train} train / {args.num_val} val, {args.size} px, {args.instances[0]}-"
          f"{args.instances[1]} instruments, {args.num_classes} classes; preset {args.preset}, batch {args.batch}, "
          f"seed {args.seed}, torch threads {torch.get_num_threads()}"
          + (f", overrides {' '.join(args.opts)}" if args.opts else ""))
    print("mask/dice: weighted last-layer losses (mean since the previous row); in box: share of each mask inside its "
          "own box; empty: share of detections with an empty mask; CPU min: process CPU time of training")
    print(HEADER)
    for r in rows:
        print(_format(r))
    print(f"outputs in {work}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
