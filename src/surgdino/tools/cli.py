"""``surgdino convert convnext --source X --output Y [--format surgdino|d2]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert pretrained weights into SurgDINO / detectron2 format")
    csub = p.add_subparsers(dest="convert_command", metavar="{convnext,groundingdino,maskdino}")
    c = csub.add_parser(
        "convnext",
        help="ConvNeXt checkpoint (official ImageNet .pth, timm, ours) → backbone weights or detectron2 .pkl",
        description="Convert a ConvNeXt checkpoint, e.g. the official convnext_tiny_1k_224_ema.pth, into SurgDINO "
                    "backbone weights (.pth) or the detectron2-style .pkl (names 'backbone.*') that MODEL.WEIGHTS loads. "
                    "The classification head is dropped.",
    )
    c.add_argument("--source", required=True, metavar="FILE", help="input checkpoint (.pth, .pt, .pkl)")
    c.add_argument("--output", required=True, metavar="FILE", help="output file (.pth for surgdino, .pkl for d2)")
    c.add_argument("--format", choices=["surgdino", "d2"], default=None,
                   help="output format (default: d2 if --output ends in .pkl, else surgdino)")
    c.set_defaults(func=_convnext)
    g = csub.add_parser(
        "groundingdino", help="GroundingDINO checkpoint (transformers folder or IDEA's .pth) → SurgDINO weights",
        description="Convert a transformers GroundingDINO folder (config.json + model.safetensors) or IDEA's original "
                    "groundingdino_swint_ogc.pth into weights MODEL.WEIGHTS loads (mismatched parts are skipped there "
                    "with a log line, e.g. backbone and input projections when fine-tuning with another backbone).")
    g.add_argument("--source", required=True, metavar="PATH", help="transformers folder or IDEA .pth")
    g.add_argument("--output", required=True, metavar="FILE", help="output .pth")
    g.set_defaults(func=_groundingdino, folder_ok=("source",))
    md = csub.add_parser(
        "maskdino", help="official MaskDINO checkpoint (.pth / detectron2 .pkl) → SurgDINO weights, with a report",
        description="Convert an official IDEA-Research/MaskDINO checkpoint into our names (decoder norms renumbered, "
                    "tied copies checked and merged, input projections and FPN convolutions re-indexed) and list every "
                    "official tensor not used; with --config-file also every model tensor left unfilled. Load the "
                    "result (or the official file directly) with MODEL.MaskDINO.ARCHITECTURE official.")
    md.add_argument("--source", required=True, metavar="FILE", help="official checkpoint (.pth, .pkl)")
    md.add_argument("--output", required=True, metavar="FILE", help="output .pth")
    md.add_argument("--config-file", default=None, metavar="FILE",
                    help="also report the tensors of this config's model the checkpoint leaves unfilled")
    md.add_argument("opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides for --config-file")
    md.set_defaults(func=_maskdino)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _groundingdino(args: argparse.Namespace) -> int:
    from surgdino.tools.convert_groundingdino import convert_groundingdino

    info = convert_groundingdino(args.source, args.output)
    print(f"wrote {info['output']}: {info['tensors']} tensors from the {info['layout']} layout"
          + (f"; {len(info['unmapped'])} not mapped: {', '.join(info['unmapped'][:5])}" if info["unmapped"] else ""))
    print(f"use it with: --config-file configs/groundingdino_swint.yaml MODEL.WEIGHTS {info['output']}")
    return 0


def _convnext(args: argparse.Namespace) -> int:
    from surgdino.tools.convert_convnext import convert_convnext

    info = convert_convnext(args.source, args.output, args.format)
    name = f"convnext_{info['size']}" if info["size"] else "convnext"
    sizing = "" if info["size"] else f" MODEL.CONVNEXT.DEPTHS \"{info['depths']}\" MODEL.CONVNEXT.DIMS \"{info['dims']}\""
    print(f"wrote {info['output']} ({info['format']}): ConvNeXt depths {info['depths']} dims {info['dims']}, "
          f"{info['tensors']} tensors, {len(info['dropped'])} head keys dropped")
    print(f"use it with: MODEL.BACKBONE.NAME {name}{sizing} MODEL.WEIGHTS {info['output']}")
    return 0


def _maskdino(args: argparse.Namespace) -> int:
    from surgdino.tools.convert_maskdino import convert_maskdino

    model_state = None
    if args.config_file or args.opts:
        from surgdino.config import load_config
        from surgdino.modeling import build_model

        model_state = build_model(load_config(args.config_file, args.opts)).state_dict()
    out, report, lines = convert_maskdino(args.source, args.output, model_state)
    print("\n".join(lines))
    print(f"wrote {out}: {len(report.converted)} tensors; use it with MODEL.MaskDINO.ARCHITECTURE official "
          f"MODEL.WEIGHTS {out}")
    return 0
