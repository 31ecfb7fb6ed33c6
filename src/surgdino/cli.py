"""``surgdino <command>``: parses arguments, then calls library functions.

Each command group lives beside the code it drives, as a module with ``register(subparsers)``.
User errors (``SurgDinoError``) print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from surgdino.errors import SurgDinoError

# (module, what it adds) — each module defines ``register(subparsers)``.
COMMAND_MODULES = (
    "surgdino.config.cli",  # config show | config keys
    "surgdino.data.cli",  # data synth | data check | data show
    "surgdino.evaluation.cli",  # evaluate
    "surgdino.tools.cli",  # convert convnext
    "surgdino.engine.cli",  # train | predict | demo
    "surgdino.modeling.backbone.cli",  # check-backbone
    "surgdino.engine.check_detector",  # check-detector
)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--config-file X`` plus trailing detectron2-style ``KEY VALUE`` overrides."""
    parser.add_argument("--config-file", metavar="FILE", required=required, default=None,
                        help="YAML config (with _BASE_ inheritance)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides after the options, e.g. SOLVER.BASE_LR 2e-4 MODEL.WEIGHTS w.pth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surgdino",
        description="SurgDINO: DI-MaskDINO instance segmentation and SurgeryCLIP backbones for surgical instruments.",
        epilog="Run `surgdino demo` for a complete CPU example on generated instrument trays.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SurgDinoError as e:
        if debug:
            raise
        print(f"surgdino {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"surgdino {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
