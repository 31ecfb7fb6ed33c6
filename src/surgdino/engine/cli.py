"""``surgdino train | predict | demo``: parse arguments, then call the engine."""

from __future__ import annotations

import argparse
import os
from typing import Any

# predict's default score threshold: the one the demo draws at (engine.demo.DRAW_SCORE_THRESHOLD;
# a test checks they agree). Not imported from there: that module imports torch.
SCORE_THRESHOLD = 0.2
# demo's default --threads (measured on 2 cores: see the README's "Shared machines").
DEMO_THREADS = 1


def register(sub: argparse._SubParsersAction) -> None:
    from surgdino.cliutil import add_config_arguments, add_overrides, add_threads_argument

    t = sub.add_parser("train", help="train (or --eval-only evaluate) a model from a config",
                       description="Train on DATASETS.TRAIN, evaluating on DATASETS.TEST; outputs in OUTPUT_DIR.")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, schedule, RNG, data order)")
    t.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS on DATASETS.TEST")
    t.add_argument("--num-gpus", type=int, default=1, help="processes on this machine (one per GPU; CPU too)")
    t.add_argument("--num-machines", type=int, default=1, help="machines in the job")
    t.add_argument("--machine-rank", type=int, default=0, help="this machine's index (0 = the one at --dist-url)")
    t.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0; auto = a free local port")
    add_config_arguments(t)
    t.set_defaults(func=lambda a: _train(t, a))

    p = sub.add_parser("predict", help="draw predictions on images and write COCO results json",
                       description="Run MODEL.WEIGHTS on images; PNG drawings and coco_results.json in --output.")
    req = p.add_argument_group("required arguments")
    req.add_argument("--input", metavar="IMAGES", help="an image, a folder of images, or a glob pattern (quoted)")
    req.add_argument("--output", metavar="DIR", help="folder for the drawings and coco_results.json")
    p.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD, metavar="T",
                   help=f"draw and keep instances scoring at least this (default {SCORE_THRESHOLD}, as the demo "
                        "draws; score = class probability x mask score, so short CPU runs rarely reach 0.5)")
    p.add_argument("--annotations", metavar="JSON", help="COCO json the images belong to: keep its image ids, "
                   "so coco_results.json can be scored with `surgdino evaluate`")
    p.add_argument("--image-root", metavar="DIR", help="folder the json's file_name are relative to (with --annotations)")
    p.add_argument("--dataset", metavar="NAME", help="like --annotations, for a dataset declared in the config")
    p.add_argument("--onnx", metavar="FILE", help="run this `surgdino export` file with onnxruntime (no config file)")
    add_config_arguments(p)
    p.usage = ("surgdino predict --input IMAGES --output DIR [--score-threshold T] [--annotations JSON "
               "[--image-root DIR] | --dataset NAME] [--config-file FILE] [--threads N] [KEY VALUE ...]")
    p.set_defaults(func=lambda a: _predict(p, a))

    from surgdino.deploy.cli import register_export

    e = register_export(sub, add_config_arguments)
    e.set_defaults(func=lambda a: _export(e, a))

    d = sub.add_parser("demo", help="synthetic trays → train a small DI-MaskDINO on CPU → evaluate → draw",
                       description="The end-to-end example: no arguments needed.")
    d.add_argument("--output", default="./output/demo", help="output folder (default ./output/demo)")
    d.add_argument("--data-root", default=None,
                   help="where the demo dataset is generated (default ~/.cache/surgdino/demo_trays)")
    d.add_argument("--quick", action="store_true", help="a few iterations on a few images (a smoke test)")
    add_threads_argument(d, default=DEMO_THREADS)
    add_overrides(d)
    d.set_defaults(func=lambda a: _demo(d, a))


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.config import load_config
    from surgdino.engine.defaults import check_inputs, resolve_device
    from surgdino.engine.launch import launch, under_torchrun
    from surgdino.errors import ConfigError

    if not args.config_file:
        raise ConfigError("train needs --config-file FILE, e.g. --config-file surgdino://demo/dimaskdino_atto_trays.yaml "
                          "(`surgdino config list` lists the packaged configs; `surgdino config init` writes one "
                          "for your data)")
    cfg = load_config(args.config_file, args.opts)
    device = resolve_device(cfg)
    if not under_torchrun():
        check_inputs(cfg, train=not args.eval_only)  # fail here, before processes start
    launch(train_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, device=device.type, args=(cfg, args.resume, args.eval_only))
    return 0


def train_main(cfg: Any, resume: bool = False, eval_only: bool = False) -> dict[str, Any]:
    """What every process runs: set up the output folder, then train or evaluate."""
    from surgdino import comm
    from surgdino.engine.defaults import Trainer, default_setup, register_datasets
    from surgdino.engine.defaults import eval_only as run_eval_only

    default_setup(cfg, tag="eval" if eval_only else "train")
    register_datasets(cfg)
    if eval_only:
        return run_eval_only(cfg)
    trainer = Trainer(cfg, resume=resume)
    results = trainer.train()
    if comm.is_main_process():
        out = os.path.abspath(cfg.OUTPUT_DIR)
        print(f"training done in {trainer.train_seconds:.0f} s; checkpoints, metrics.jsonl, plots in {out}")
        if results:
            from surgdino.evaluation.coco_evaluator import format_metrics

            print(format_metrics(results))
    return results


def _predict(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.config import load_config
    from surgdino.engine.predictor import Predictor, dataset_image_ids, list_images, predict_files

    missing = [f for f in ("input", "output") if not getattr(args, f)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")
    if args.onnx:
        from surgdino.deploy.cli import predict_onnx

        return predict_onnx(args)
    cfg = load_config(args.config_file, args.opts)
    paths = list_images(args.input)
    predictor = Predictor(cfg)
    out = predict_files(predictor, paths, args.output, score_threshold=args.score_threshold,
                        image_ids=dataset_image_ids(cfg, args, paths, predictor))
    print(f"{len(out['images'])} drawings and {os.path.basename(out['results'])} "
          f"({out['num_instances']} instances) in {os.path.abspath(args.output)}")
    return 0


def _export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.deploy.cli import run_export

    return run_export(parser, args)


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.engine.demo import run_demo

    run_demo(output=args.output, data_root=args.data_root, quick=args.quick, opts=args.opts)
    return 0
