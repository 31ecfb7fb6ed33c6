"""``surgdino train | predict | demo``: parse arguments, then call the engine."""

from __future__ import annotations

import argparse
import os

# predict's default score threshold: the one the demo draws at (engine.demo.DRAW_SCORE_THRESHOLD;
# a test checks they agree). Not imported from there: that module imports torch.
SCORE_THRESHOLD = 0.2
# demo's default --threads (measured on 2 cores: see the README's "Shared machines").
DEMO_THREADS = "auto"


def register(sub: argparse._SubParsersAction) -> None:
    from surgdino.cliutil import add_config_arguments, add_overrides, add_threads_argument

    t = sub.add_parser("train", help="train (or --eval-only evaluate) a model from a config",
                       description="Train on DATASETS.TRAIN, evaluating on DATASETS.TEST; outputs in OUTPUT_DIR.")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, schedule, RNG, data order)")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an OUTPUT_DIR that holds a run (deletes its checkpoints and metrics)")
    t.add_argument("--eval-only", action="store_true",
                   help="only evaluate MODEL.WEIGHTS on DATASETS.TEST (results in OUTPUT_DIR/eval_<weights>_<time>)")
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
    p.add_argument("--prompt", help='GroundingDINO: what to find, e.g. "mayo scissors . allis forceps" '
                   "(default: the dataset's class names)")
    p.add_argument("--box-threshold", type=float, default=0.35,
                   help="GroundingDINO: keep boxes whose best token probability exceeds this (default 0.35)")
    p.add_argument("--text-threshold", type=float, default=0.25,
                   help="GroundingDINO: a box's phrase is the prompt's words at tokens above this (default 0.25)")
    add_config_arguments(p)
    p.usage = ("surgdino predict --input IMAGES --output DIR [--score-threshold T] [--annotations JSON "
               "[--image-root DIR] | --dataset NAME] "
               "[--prompt TEXT --box-threshold B --text-threshold T] [--config-file FILE] [--threads N] [KEY VALUE ...]")
    p.set_defaults(func=lambda a: _predict(p, a))

    from surgdino.deploy.cli import register_export

    register_check_detector(sub)
    e = register_export(sub, add_config_arguments)
    e.set_defaults(func=lambda a: _export(e, a))

    d = sub.add_parser("demo", help="synthetic trays → train a small DI-MaskDINO on CPU → evaluate → draw",
                       description="The end-to-end example: no arguments needed.")
    d.add_argument("--output", default="./output/demo", help="output folder (default ./output/demo)")
    d.add_argument("--data-root", default=None,
                   help="where the demo dataset is generated (default ~/.cache/surgdino/demo_trays)")
    d.add_argument("--quick", action="store_true", help="a few iterations on a few images (a smoke test)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo from its last checkpoint")
    d.add_argument("--overwrite", action="store_true", help="start over in an --output that holds a demo run")
    add_threads_argument(d, default=DEMO_THREADS)
    add_overrides(d)
    d.set_defaults(func=lambda a: _demo(d, a))


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.config import load_config
    from surgdino.engine.run import run_train
    from surgdino.errors import ConfigError

    if not args.config_file:
        raise ConfigError("train needs --config-file FILE, e.g. --config-file surgdino://demo/dimaskdino_atto_trays.yaml "
                          "(`surgdino config list` lists the packaged configs; `surgdino config init` writes one "
                          "for your data)")
    cfg = load_config(args.config_file, args.opts)
    run_train(cfg, resume=args.resume, eval_only=args.eval_only, overwrite=args.overwrite, num_gpus=args.num_gpus,
              num_machines=args.num_machines, machine_rank=args.machine_rank, dist_url=args.dist_url)
    return 0


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
    threshold = args.score_threshold
    if args.prompt or cfg.MODEL.META_ARCHITECTURE == "GroundingDINO":
        from surgdino.engine.grounded_predictor import GroundedPredictor

        predictor = GroundedPredictor(cfg, args.prompt, box_threshold=args.box_threshold,
                                      text_threshold=args.text_threshold)
        threshold = 0.0  # boxes are already those above --box-threshold
    else:
        predictor = Predictor(cfg)
    out = predict_files(predictor, paths, args.output, score_threshold=threshold,
                        image_ids=dataset_image_ids(cfg, args, paths, predictor))
    print(f"{len(out['images'])} drawings and {os.path.basename(out['results'])} "
          f"({out['num_instances']} instances) in {os.path.abspath(args.output)}")
    return 0


def _export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.deploy.cli import run_export

    return run_export(parser, args)


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.engine.demo import run_demo

    run_demo(output=args.output, data_root=args.data_root, quick=args.quick, opts=args.opts, resume=args.resume,
             overwrite=args.overwrite)
    return 0


CHECK_DETECTOR_SIZES = ("480x640", "416x544")
CHECK_DETECTOR_DESCRIPTION = """Build the detector of a config and check it on a dummy padded batch (two image sizes):
eval forward with a text prompt (output shapes of each part, results per image), then one training step
(losses, backward, optimizer step); time, peak memory, and whether gradients reach every trainable part.
Exit code 0 when all checks pass, 1 otherwise.

example: surgdino check-detector --config-file configs/groundingdino_surgeryclip.yaml \\
             --prompt "mayo scissors . allis forceps" MODEL.SURGERYCLIP.CKPT /models/ViT-B-16.pt"""


def register_check_detector(sub: argparse._SubParsersAction) -> None:
    """``surgdino check-detector``: the user document's ``run_gdino_sanity.py`` (engine/check_detector.py)."""
    from surgdino.cliutil import add_config_arguments

    p = sub.add_parser("check-detector", help="build the detector; one eval pass and one training step on a dummy "
                       "padded batch: shapes, time, memory, gradient flow", description=CHECK_DETECTOR_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="class names for the text prompt (default: the dataset's, else a few instrument names)")
    p.add_argument("--sizes", nargs="+", metavar="HxW",
                   help=f"image sizes of the batch (default {' '.join(CHECK_DETECTOR_SIZES)})")
    p.add_argument("--device", default="auto", help="auto (MODEL.DEVICE), cpu, cuda, cuda:N")
    add_config_arguments(p, required=True)
    p.set_defaults(func=_check_detector)


def _check_detector(args: argparse.Namespace) -> int:
    import re

    from surgdino.config import load_config
    from surgdino.engine.check_detector import check_detector
    from surgdino.errors import ConfigError
    from surgdino.modeling.backbone.cli import _parse_size

    given = list(args.sizes or [])
    n = next((i for i, s in enumerate(given) if not re.fullmatch(r"\d+[xX]\d+", s)), len(given))
    cfg = load_config(args.config_file, given[n:] + list(args.opts or []))  # KEY VALUE pairs after --sizes
    sizes = [_parse_size(s) for s in (given[:n] or CHECK_DETECTOR_SIZES)]
    if len(sizes) < 2:
        raise ConfigError("--sizes: give two sizes (a padded batch), e.g. --sizes 480x640 416x544")
    return 0 if check_detector(cfg, sizes=sizes, prompt=args.prompt, device=args.device) else 1
