"""``surgdino train | predict | demo``: parse arguments, then call the engine."""

from __future__ import annotations

import argparse
import os
from typing import Any


def _pull_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options written after the first ``KEY VALUE`` pair land in ``args.opts`` (argparse REMAINDER);
    move those this command knows back onto ``args`` so ``--input X`` works anywhere on the line."""
    known = {s: a for a in parser._actions for s in a.option_strings}
    rest: list[str] = []
    opts = list(args.opts or [])
    i = 0
    while i < len(opts):
        tok = opts[i]
        name, _, inline = tok.partition("=")
        action = known.get(name)
        if action is None or not tok.startswith("--"):
            rest.append(tok)
            i += 1
            continue
        if action.nargs == 0:
            setattr(args, action.dest, action.const if action.const is not None else True)
            i += 1
            continue
        if inline:
            raw, i = inline, i + 1
        elif i + 1 < len(opts):
            raw, i = opts[i + 1], i + 2
        else:
            parser.error(f"argument {name}: expected one argument")
        setattr(args, action.dest, action.type(raw) if action.type else raw)
    args.opts = rest


def register(sub: argparse._SubParsersAction) -> None:
    from surgdino.cli import add_config_arguments

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
    p.add_argument("--input", help="an image, a folder of images, or a glob pattern (quoted); required")
    p.add_argument("--output", help="folder for the drawings and coco_results.json; required")
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw and keep instances scoring at least this")
    p.add_argument("--prompt", help='GroundingDINO: what to find, e.g. "mayo scissors . allis forceps" '
                   "(default: the dataset's class names)")
    p.add_argument("--box-threshold", type=float, default=0.35,
                   help="GroundingDINO: keep boxes whose best token probability exceeds this (default 0.35)")
    p.add_argument("--text-threshold", type=float, default=0.25,
                   help="GroundingDINO: a box's phrase is the prompt's words at tokens above this (default 0.25)")
    add_config_arguments(p)
    p.set_defaults(func=lambda a: _predict(p, a))

    d = sub.add_parser("demo", help="synthetic trays → train a small DI-MaskDINO on CPU → evaluate → draw",
                       description="The end-to-end example: no arguments needed.")
    d.add_argument("--output", default="./output/demo", help="output folder (default ./output/demo)")
    d.add_argument("--data-root", default=None,
                   help="where the demo dataset is generated (default ~/.cache/surgdino/demo_trays)")
    d.add_argument("--quick", action="store_true", help="a few iterations on a few images (a smoke test)")
    d.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    d.set_defaults(func=lambda a: _demo(d, a))


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.config import load_config
    from surgdino.engine.defaults import check_inputs, resolve_device
    from surgdino.engine.launch import launch, under_torchrun
    from surgdino.errors import ConfigError

    _pull_options(parser, args)
    if not args.config_file:
        raise ConfigError("train needs --config-file FILE (e.g. configs/demo/...yaml)")
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
    from surgdino.engine.predictor import Predictor, list_images, predict_files

    _pull_options(parser, args)
    missing = [f for f in ("input", "output") if not getattr(args, f)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join('--' + m for m in missing)}")
    cfg = load_config(args.config_file, args.opts)
    paths = list_images(args.input)
    threshold = args.score_threshold
    if args.prompt or cfg.MODEL.META_ARCHITECTURE == "GroundingDINO":
        from surgdino.engine.grounded_predictor import GroundedPredictor

        predictor = GroundedPredictor(cfg, args.prompt, box_threshold=args.box_threshold,
                                      text_threshold=args.text_threshold)
        threshold = 0.0  # boxes are already those above --box-threshold
    else:
        predictor = Predictor(cfg)
    out = predict_files(predictor, paths, args.output, score_threshold=threshold)
    print(f"{len(out['images'])} drawings and {os.path.basename(out['results'])} "
          f"({out['num_instances']} instances) in {os.path.abspath(args.output)}")
    return 0


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.engine.demo import run_demo

    _pull_options(parser, args)
    run_demo(output=args.output, data_root=args.data_root, quick=args.quick, opts=args.opts)
    return 0
