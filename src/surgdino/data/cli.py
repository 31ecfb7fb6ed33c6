"""``surgdino data check|synth|show``: validate COCO annotations, generate trays, draw ground truth."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check COCO annotations, generate synthetic trays, draw ground truth",
                       description="Dataset tools: check (validate a COCO json), synth (generate trays), "
                                   "show (draw annotations).")
    dsub = p.add_subparsers(dest="data_command", metavar="{check,synth,show}")

    check = dsub.add_parser(
        "check", help="validate a COCO instance json and print statistics",
        description="Validate a COCO instance json against its images. Exit 0 with statistics (images, "
                    "instances, instances per image, per-class counts), or exit 2 listing every problem "
                    "(file, index, field and fix).")
    check.add_argument("--annotations", metavar="JSON", help="COCO instance json, e.g. annotations/instances_train.json")
    check.add_argument("--image-root", metavar="DIR", help="folder the images' file_name are relative to")
    check.add_argument("--dataset", metavar="NAME",
                       help="check a dataset declared in the config (DATASETS.REGISTER) instead of --annotations")
    check.add_argument("--decode", action="store_true", help="also decode every image (slow; finds corrupt files)")
    check.add_argument("--no-images", action="store_true", help="check the json only, not the image files")
    from surgdino.cliutil import add_config_arguments

    add_config_arguments(check)
    check.set_defaults(func=_check)

    synth = dsub.add_parser(
        "synth", help="generate a synthetic instrument-tray dataset (COCO format)",
        description="Generate procedural instrument trays with occlusion and many classes: "
                    "OUT/annotations/instances_{train,val}.json and OUT/{train,val}/. Deterministic by seed.")
    synth.add_argument("--out", required=True, metavar="DIR", help="output folder")
    synth.add_argument("--num-train", type=int, default=200, metavar="N", help="training images (default 200)")
    synth.add_argument("--num-val", type=int, default=50, metavar="N", help="validation images (default 50)")
    synth.add_argument("--num-classes", type=int, default=20, metavar="C", help="instrument classes (default 20)")
    synth.add_argument("--image-size", type=int, default=512, metavar="S", help="square image side in pixels (default 512)")
    synth.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    synth.add_argument("--instances", type=int, nargs=2, default=(20, 30), metavar=("MIN", "MAX"),
                       help="instruments per image, drawn uniformly in [MIN, MAX] (default 20 30)")
    synth.add_argument("--min-visible", type=float, default=0.3, metavar="F",
                       help="drop instances with less than this visible fraction after occlusion (default 0.3)")
    synth.add_argument("--field-cm", type=float, default=None, metavar="CM",
                       help="tray width in view, in cm: smaller zooms in and draws larger instruments "
                            "(default 40: 12.8 px/cm at 512 px)")
    synth.add_argument("--workers", type=int, default=0, metavar="W", help="worker processes (default 0: in process)")
    synth.set_defaults(func=_synth)

    show = dsub.add_parser(
        "show", help="draw annotations (masks, boxes, class names) to PNG files",
        description="Draw the ground-truth masks, boxes and class names of the first N images to "
                    "OUT/<image name>.png (the same drawing code draws predictions). Give --annotations and "
                    "--image-root, or --dataset NAME with --config-file.")
    show.add_argument("--annotations", metavar="JSON", help="COCO instance json")
    show.add_argument("--image-root", metavar="DIR", help="folder the images' file_name are relative to")
    show.add_argument("--dataset", metavar="NAME", help="a dataset name from the config (DATASETS.REGISTER) instead")
    show.add_argument("--out", required=True, metavar="DIR", help="output folder for PNGs")
    show.add_argument("--num", type=int, default=8, metavar="N", help="number of images (default 8)")
    show.add_argument("--alpha", type=float, default=0.5, help="mask opacity (default 0.5)")
    add_config_arguments(show)
    show.set_defaults(func=_show)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _dataset_files(args: argparse.Namespace) -> tuple[str, str]:
    """(json_file, image_root) from --annotations/--image-root or from --dataset NAME in the config."""
    from surgdino.errors import DataError

    if args.dataset:
        from surgdino.config import load_config
        from surgdino.data.catalog import (
            SYNTHETIC_NAMES,
            DatasetCatalog,
            MetadataCatalog,
            ensure_synthetic_dataset,
            register_datasets_from_config,
        )

        register_datasets_from_config(load_config(args.config_file, args.opts))
        if args.dataset not in DatasetCatalog:
            DatasetCatalog.get(args.dataset)  # raises the unknown-dataset error with the registered names
        meta = MetadataCatalog.get(args.dataset).__dict__
        if args.dataset in SYNTHETIC_NAMES:
            ensure_synthetic_dataset(meta["synthetic_root"])
        return meta["json_file"], meta["image_root"]
    if args.annotations and args.image_root:
        return args.annotations, args.image_root
    raise DataError(f"data {args.data_command}: give --annotations JSON and --image-root DIR, "
                    "or --dataset NAME (with --config-file)")


def _check(args: argparse.Namespace) -> int:
    from surgdino.data.coco import validate_coco

    json_file, image_root = _dataset_files(args)
    report = validate_coco(json_file, image_root, check_images=not args.no_images, decode_images=args.decode)
    if report.problems:
        for problem in report.problems:
            print(problem, file=sys.stderr)
        print(f"surgdino data check: {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''} "
              f"in {report.json_file}", file=sys.stderr)
        return 2
    print(report.summary())
    print("OK: no problems found" + ("" if args.decode else " (add --decode to also decode every image)"))
    return 0


def _synth(args: argparse.Namespace) -> int:
    from surgdino.errors import DataError

    lo, hi = args.instances
    if not 1 <= lo <= hi:
        raise DataError(f"--instances {lo} {hi}: need 1 <= MIN <= MAX")
    for flag, v in (("--num-train", args.num_train), ("--num-val", args.num_val)):
        if v < 0:
            raise DataError(f"{flag} {v}: must be >= 0")
    if args.num_classes < 1 or args.image_size < 32:
        raise DataError("--num-classes must be >= 1 and --image-size >= 32")
    from surgdino.data.paths import make_output_dir
    from surgdino.data.synthetic import existing_dataset_files, generate_synthetic_dataset

    found = existing_dataset_files(args.out)
    if found:
        raise DataError(f"--out {args.out}: already holds a dataset ({', '.join(found)}); refusing to overwrite "
                        "its annotations and images: choose a new --out folder, or delete that one first")
    make_output_dir(args.out, "--out")
    info = generate_synthetic_dataset(
        args.out, num_train=args.num_train, num_val=args.num_val, num_classes=args.num_classes,
        image_size=args.image_size, seed=args.seed, instances_per_image=(lo, hi),
        min_visible=args.min_visible, workers=args.workers, progress=True,
        **({} if args.field_cm is None else {"field_cm": args.field_cm}),
    )
    print(f"Synthetic trays written to {os.path.abspath(args.out)}")
    for k, v in (info or {}).items():
        print(f"  {k}: {v}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import numpy as np

    from surgdino.data.coco import decode_segmentation, load_coco
    from surgdino.data.imageio import read_image
    from surgdino.data.paths import make_output_dir
    from surgdino.errors import DataError
    from surgdino.visualize import draw_instances, save_image

    json_file, image_root = _dataset_files(args)
    make_output_dir(args.out, "--out")
    records, cats = load_coco(json_file, image_root)
    class_names = [c["name"] for c in cats]
    written = []
    for r in records[: max(0, args.num)]:
        image = read_image(r["file_name"])  # [H, W, 3]
        h, w = r["height"], r["width"]
        if image.shape[:2] != (h, w):
            raise DataError(f"{r['file_name']}: image is {image.shape[1]}x{image.shape[0]} but the json says {w}x{h}")
        anns = r["annotations"]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)  # [K, 4] xyxy
        masks = np.stack([decode_segmentation(a["segmentation"], h, w) for a in anns]) if anns else None  # [K, H, W]
        labels = np.array([a["category_id"] for a in anns], dtype=np.int64)
        drawn = draw_instances(image, boxes, masks, labels, class_names, alpha=args.alpha)
        stem = os.path.splitext(os.path.basename(r["file_name"]))[0]
        path = os.path.join(args.out, f"{stem}.png")
        if path in written:  # same name in two sub-folders
            path = os.path.join(args.out, f"{stem}_{r['image_id']}.png")
        written.append(save_image(path, drawn))
    print(f"Wrote {len(written)} image{'s' if len(written) != 1 else ''} to {os.path.abspath(args.out)}")
    return 0
