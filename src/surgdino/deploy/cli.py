"""``surgdino export`` and ``surgdino predict --onnx``: arguments → ``surgdino.deploy`` (imported lazily)."""

from __future__ import annotations

import argparse
import os
from typing import Any


def register_export(sub: argparse._SubParsersAction, add_config_arguments: Any) -> argparse.ArgumentParser:
    e = sub.add_parser("export", help="export a trained model to ONNX (checked with onnxruntime against PyTorch)",
                       description="Export MODEL.WEIGHTS (its EMA weights if it has them) to an ONNX file with the "
                                   "config and class names in its metadata; `surgdino predict --onnx FILE` runs it. "
                                   "MaskDINO / DI-MaskDINO, or a GroundingDINO with its class names as a fixed prompt "
                                   "(text features baked in).")
    e.add_argument("--output", metavar="FILE", help="the .onnx file to write; required")
    e.add_argument("--height", type=int, default=None, help="fixed input height (default: the test size, rounded up)")
    e.add_argument("--width", type=int, default=None, help="fixed input width (default: the test size, rounded up)")
    e.add_argument("--dynamic", action="store_true", help="any batch, height and width (multiples of the size "
                   "divisibility, at least a minimum side stored in the metadata); traced at --height/--width")
    add_config_arguments(e)
    return e


def run_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from surgdino.config import load_config
    from surgdino.deploy.export import export_onnx
    from surgdino.errors import ConfigError

    if not args.output:
        parser.error("the following arguments are required: --output")
    if not args.config_file:
        raise ConfigError("export needs --config-file FILE (the config the model was trained with) and MODEL.WEIGHTS")
    cfg = load_config(args.config_file, args.opts)
    report = export_onnx(cfg, args.output, height=args.height, width=args.width, dynamic=args.dynamic)
    checks = [v for k, v in report.items() if k.startswith("check")]
    worst = max((c["raw_rel_diff"] for c in checks), default=float("nan"))
    size = "dynamic input, traced at {}x{}".format(*report["size"]) if report["dynamic"] else \
        "input {}x{}".format(*report["size"])
    print(f"wrote {os.path.abspath(args.output)} (opset {report['opset']}, {size}); onnxruntime = PyTorch on "
          f"{len(checks)} sample(s): raw outputs within {worst:.1e}, same detections")
    return 0


def predict_onnx(args: argparse.Namespace) -> int:
    """``predict --onnx FILE``: onnxruntime with the file's metadata; no config file."""
    from surgdino.deploy.predictor import Predictor
    from surgdino.engine.predictor import list_images, predict_files
    from surgdino.errors import ConfigError

    if args.config_file or args.opts:
        raise ConfigError("predict --onnx takes its config from the ONNX file's metadata; drop --config-file and "
                          "KEY VALUE overrides (re-export to change them)")
    paths = list_images(args.input)
    predictor = _FilePredictor(Predictor(args.onnx))
    out = predict_files(predictor, paths, args.output, score_threshold=args.score_threshold)
    print(f"{len(out['images'])} drawings and {os.path.basename(out['results'])} "
          f"({out['num_instances']} instances) in {os.path.abspath(args.output)}")
    return 0


class _FilePredictor:
    """What ``predict_files`` calls: ``(image, image_id, file_name)`` → torch instances, plus class names
    and the dataset's category ids."""

    def __init__(self, predictor: Any):
        self.predictor = predictor
        self.thing_classes = predictor.class_names
        self.contiguous_to_dataset_id = dict(predictor.dataset_ids) or None

    def __call__(self, image: Any, image_id: int = 0, file_name: str = "") -> dict[str, Any]:
        return self.predictor.instances([image])[0]
