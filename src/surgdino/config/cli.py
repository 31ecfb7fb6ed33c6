"""``surgdino config show|keys``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from surgdino.cli import add_config_arguments

    p = sub.add_parser("config", help="show the merged config or list keys with their docs")
    csub = p.add_subparsers(dest="config_command", metavar="{show,keys}")
    show = csub.add_parser("show", help="print the merged config (defaults ← file ← KEY VALUE)")
    add_config_arguments(show)
    show.set_defaults(func=_show)
    keys = csub.add_parser("keys", help="list config keys with type, default and doc")
    keys.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. MODEL.MaskDINO")
    keys.set_defaults(func=_keys)
    from surgdino.config.import_gdino import register as register_import_gdino

    register_import_gdino(csub)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _show(args: argparse.Namespace) -> int:
    from surgdino.config import load_config

    print(load_config(args.config_file, args.opts).dump(), end="")
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
