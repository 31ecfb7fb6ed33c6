"""``surgdino config show|keys|list|init``."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from surgdino.cliutil import add_config_arguments

    p = sub.add_parser("config", help="write a config for your data, list packaged configs, show the merged config, list keys")
    csub = p.add_subparsers(dest="config_command", metavar="{init,list,show,keys}")
    init = csub.add_parser(
        "init", help="write a commented config sized from your COCO dataset (step one of training on your data)",
        description="Read a COCO dataset (classes, images, instances per image, object and image sizes) and write a "
                    "commented config that registers the splits and sizes the model from the data: NUM_CLASSES, "
                    "queries, denoising, detections per image, input sizes, schedule. Prints what it chose and why.")
    init.add_argument("--annotations", required=True, metavar="JSON", help="training COCO instances json")
    init.add_argument("--val", metavar="JSON", default=None, help="validation COCO instances json (default: none)")
    init.add_argument("--image-root", metavar="DIR", default=None,
                      help="folder of the training images (default: guessed from the json's location, e.g. "
                           "annotations/instances_train.json -> train/)")
    init.add_argument("--val-image-root", metavar="DIR", default=None,
                      help="folder of the validation images (default: guessed like --image-root)")
    init.add_argument("--preset", choices=["demo", "tray", "user-document"], default="demo",
                      help="model size: demo (the demo's CPU-sized model, minutes per run), tray (DI-MaskDINO "
                           "ConvNeXt-Tiny, the paper's defaults), user-document (the user document's dense-tray "
                           "configuration: 4 levels, 9 decoder layers; GPU). Default demo")
    init.add_argument("--output", required=True, metavar="YAML", help="the config file to write")
    init.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    init.set_defaults(func=_init)
    lst = csub.add_parser("list", help="list the packaged configs (usable as surgdino://NAME anywhere a config "
                                       "path is taken, also as _BASE_)")
    lst.set_defaults(func=_list)
    show = csub.add_parser("show", help="print the merged config (defaults ← file ← KEY VALUE) after checking it "
                                        "against its datasets, as train does")
    show.add_argument("--no-check", action="store_true",
                      help="print without reading the datasets (e.g. a template whose paths are placeholders)")
    add_config_arguments(show, threads=False)
    show.set_defaults(func=_show)
    keys = csub.add_parser("keys", help="list config keys with type, default and doc")
    keys.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. MODEL.MaskDINO")
    keys.set_defaults(func=_keys)
    from surgdino.config.import_gdino import register as register_import_gdino

    register_import_gdino(csub)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _show(args: argparse.Namespace) -> int:
    from surgdino.config import load_config

    cfg = load_config(args.config_file, args.opts)
    warnings = []
    if not args.no_check and (cfg.DATASETS.TRAIN or cfg.DATASETS.TEST):
        from surgdino.data.checks import check_datasets
        from surgdino.errors import SurgDinoError
        from surgdino.log import get_logger

        root = get_logger()
        level = root.level
        root.setLevel("ERROR")  # log lines would mix with the YAML on stdout; warnings go to stderr
        try:
            warnings = check_datasets(cfg, train=True)
        except SurgDinoError as e:
            raise type(e)(f"{e} (`config show --no-check` prints the config without reading its datasets)") from None
        finally:
            root.setLevel(level)
    print(cfg.dump(), end="")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    from surgdino.config.core import PACKAGE_SCHEME, packaged_config_dir, packaged_configs

    for name in packaged_configs():
        print(f"{PACKAGE_SCHEME}{name}")
    print(f"(files in {packaged_config_dir()}; use as --config-file {PACKAGE_SCHEME}NAME or _BASE_: "
          f"{PACKAGE_SCHEME}NAME)", file=sys.stderr)
    return 0


def _init(args: argparse.Namespace) -> int:
    from surgdino.config.init import init_config

    init_config(args.annotations, args.output, val_json=args.val, image_root=args.image_root,
                val_image_root=args.val_image_root, preset=args.preset, force=args.force)
    return 0


def _keys(args: argparse.Namespace) -> int:
    from surgdino.config import schema
    from surgdino.errors import ConfigError

    rows = [k for name, k in schema().items() if name.upper().startswith(args.prefix.upper())]
    if not rows:
        raise ConfigError(f"no config key starts with {args.prefix!r}")
    for k in sorted(rows, key=lambda k: k.name):
        choices = f" one of {list(k.choices)}" if k.choices else ""
        print(f"{k.name}  ({k.type}, default {k.default!r}){choices}\n    {k.doc}")
    return 0
