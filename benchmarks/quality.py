"""DI-MaskDINO vs MaskDINO quality on synthetic instrument trays, trained the same CPU iterations.

Generates the demo's trays (``surgdino.engine.demo.DEMO_DATA``: 300 train / 30 val, 256 px, 5 classes,
3-6 instruments, 20 cm in view), trains each decoder with the library's engine (``surgdino.engine``) from
the packaged demo config (ConvNeXt-atto, 64-wide heads, its schedule) differing only in
``MODEL.MaskDINO.TRANSFORMER_DECODER_NAME``, evaluates COCO mask and box AP on the validation trays and
prints a table with the DI/MaskDINO ratios.

    python benchmarks/quality.py --threads 2            # the demo's schedule: ~13 min per model on 2 cores
    python benchmarks/quality.py --seed 1 --threads 2   # another data and training seed
    python benchmarks/quality.py --iters 40 --num-train 16 --num-val 4   # smoke run

Small runs are noisy: AP after a few hundred iterations mostly measures how fast each model starts to
learn, not its converged quality. Compare several seeds (``--seed``) before drawing conclusions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

DECODERS = {"MaskDINO": "MaskDINODecoder", "DI-MaskDINO": "DIMaskDINODecoder", "DI-official": "DIMaskDINODecoder"}
DI_DESIGNS = {"DI-MaskDINO": "surgdino", "DI-official": "official"}  # our DI design and the reference's


def _config(out_dir: str, data: str, name: str, args: argparse.Namespace):
    from surgdino.config import load_config
    from surgdino.config.core import merge_opts
    from surgdino.config.validate import validate
    from surgdino.engine.demo import demo_config_path

    cfg = load_config(demo_config_path())
    schedule = {}
    if args.iters is not None:  # shorter or longer than the demo: scale its schedule
        schedule = {"SOLVER.MAX_ITER": args.iters,
                    "SOLVER.STEPS": [int(args.iters * 0.85)] if args.iters >= 20 else [],
                    "SOLVER.WARMUP_ITERS": min(cfg.SOLVER.WARMUP_ITERS, max(args.iters // 10, 0)),
                    "SOLVER.LOG_PERIOD": max(args.iters // 10, 1)}
    cfg = cfg.merge({
        "OUTPUT_DIR": out_dir,
        "DATASETS.REGISTER": [
            {"name": "quality_train", "json_file": os.path.join(data, "annotations", "instances_train.json"),
             "image_root": os.path.join(data, "train")},
            {"name": "quality_val", "json_file": os.path.join(data, "annotations", "instances_val.json"),
             "image_root": os.path.join(data, "val")},
        ],
        "DATASETS.TRAIN": ["quality_train"],
        "DATASETS.TEST": ["quality_val"],
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": args.num_classes,
        "MODEL.MaskDINO.TRANSFORMER_DECODER_NAME": DECODERS[name],
        "MODEL.MaskDINO.DI_DESIGN": DI_DESIGNS.get(name, ""),
        **schedule,
        "SOLVER.IMS_PER_BATCH": args.batch,
        "SOLVER.CHECKPOINT_PERIOD": 100000,
        "TEST.EVAL_PERIOD": 0,
        "SEED": args.seed,
        "MODEL.DEVICE": "cpu",
    }, source="benchmarks/quality.py")
    cfg = merge_opts(cfg, args.opts)
    validate(cfg)
    return cfg


def _ap(results: dict, task: str) -> tuple[float, float, float]:
    r = results.get(task) or {}
    return float(r.get("AP", float("nan"))), float(r.get("AP50", float("nan"))), float(r.get("AP75", float("nan")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from surgdino.engine.demo import DEMO_DATA

    p.add_argument("--iters", type=int, default=None,
                   help="training iterations per model (default: the demo config's schedule)")
    p.add_argument("--batch", type=int, default=4, help="images per iteration (default 4)")
    p.add_argument("--num-train", type=int, default=DEMO_DATA["num_train"])
    p.add_argument("--num-val", type=int, default=DEMO_DATA["num_val"])
    p.add_argument("--num-classes", type=int, default=DEMO_DATA["num_classes"])
    p.add_argument("--size", type=int, default=DEMO_DATA["image_size"], help="tray image size")
    p.add_argument("--instances", type=int, nargs=2, default=DEMO_DATA["instances_per_image"], metavar=("MIN", "MAX"))
    p.add_argument("--field-cm", type=float, default=DEMO_DATA["field_cm"],
                   help="tray width in view (cm); smaller draws larger instruments")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--models", nargs="+", default=["MaskDINO", "DI-MaskDINO"], choices=list(DECODERS),
                   help="DI-official: DI-MaskDINO in the reference's design (MODEL.MaskDINO.DI_DESIGN official)")
    p.add_argument("--work-dir", default=None, help="where data and outputs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides for both models, e.g. SOLVER.BASE_LR 1e-3")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from surgdino.data.synthetic import generate_synthetic_dataset
    from surgdino.engine.run import train_main

    work = args.work_dir or tempfile.mkdtemp(prefix="surgdino_quality_")
    data = os.path.join(work, "data")
    if not os.path.isfile(os.path.join(data, "annotations", "instances_val.json")):
        generate_synthetic_dataset(data, num_train=args.num_train, num_val=args.num_val,
                                   num_classes=args.num_classes, image_size=args.size, seed=args.seed,
                                   instances_per_image=tuple(args.instances), field_cm=args.field_cm,
                                   progress=False)
    rows = {}
    for name in args.models:
        cfg = _config(os.path.join(work, name), data, name, args)
        t0 = time.perf_counter()
        results = train_main(cfg)
        seconds = time.perf_counter() - t0
        rows[name] = {"seconds": seconds, "segm": _ap(results, "segm"), "bbox": _ap(results, "bbox")}

    print()
    print(f"synthetic trays: {args.num_train} train / {args.num_val} val images, {args.size} px, "
          f"{args.num_classes} classes, {args.instances[0]}-{args.instances[1]} instruments, {args.field_cm:g} cm "
          f"in view; {cfg.SOLVER.MAX_ITER} iterations x {args.batch} images, seed {args.seed}, torch threads {torch.get_num_threads()}"
          + (f", overrides {' '.join(args.opts)}" if args.opts else ""))
    print(f"{'model':<12} {'train+eval s':>12} {'mask AP':>8} {'AP50':>6} {'AP75':>6} {'box AP':>7} {'AP50':>6} {'AP75':>6}")
    for name, r in rows.items():
        s, b = r["segm"], r["bbox"]
        print(f"{name:<12} {r['seconds']:>12.0f} {s[0]:>8.1f} {s[1]:>6.1f} {s[2]:>6.1f} {b[0]:>7.1f} {b[1]:>6.1f} {b[2]:>6.1f}")
    if len(rows) == 2 and "MaskDINO" in rows:  # the DI variant over MaskDINO
        base, di = rows["MaskDINO"], next(r for n, r in rows.items() if n != "MaskDINO")

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}" if b > 0 else "n/a"

        print(f"{'DI / MaskDINO':<12} {ratio(di['seconds'], base['seconds']):>12} "
              f"{ratio(di['segm'][0], base['segm'][0]):>8} {ratio(di['segm'][1], base['segm'][1]):>6} "
              f"{ratio(di['segm'][2], base['segm'][2]):>6} {ratio(di['bbox'][0], base['bbox'][0]):>7} "
              f"{ratio(di['bbox'][1], base['bbox'][1]):>6} {ratio(di['bbox'][2], base['bbox'][2]):>6}")
    print(f"outputs in {work}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
