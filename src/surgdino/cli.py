"""``surgdino <command>``: parses arguments, then calls library functions.

Each command group lives beside the code it drives, as a module with ``register(subparsers)``;
shared argument helpers are in ``surgdino.cliutil`` (the command modules never import this one).
Building the parser imports no torch, so ``--help`` and argument errors are fast.
User errors (``SurgDinoError``) print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from surgdino.cliutil import add_config_arguments, check_file_arguments, pull_options, set_threads
from surgdino.errors import SurgDinoError

__all__ = ["add_config_arguments", "build_parser", "main"]  # add_config_arguments: old import path

# (module, what it adds) — each module defines ``register(subparsers)``.
COMMAND_MODULES = (
    "surgdino.config.cli",  # config show | config keys | config list | config init
    "surgdino.data.cli",  # data synth | data check | data show
    "surgdino.evaluation.cli",  # evaluate
    "surgdino.tools.cli",  # convert convnext
    "surgdino.engine.cli",  # train | predict | demo
    "surgdino.modeling.backbone.cli",  # check-backbone
)
# Commands that compute but take no config: they get ``--threads`` here (the others through
# ``add_config_arguments``).
_THREADED = (("evaluate",), ("data", "synth"), ("convert", "convnext"))


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
    from surgdino.cliutil import add_threads_argument

    for path in _THREADED:
        p = sub.choices.get(path[0])
        for name in path[1:]:
            nested = [a for a in (p._actions if p else []) if isinstance(a, argparse._SubParsersAction)]
            p = nested[0].choices.get(name) if nested else None
        if p is not None:
            add_threads_argument(p)
    return parser


def _file_being_read(error: BaseException, args: argparse.Namespace) -> str | None:
    """The file a failing reader had open: the innermost frame's ``json_file``/``path``-like local naming an
    existing file, else the first existing file on the command line."""
    names = ("json_file", "path", "config_file", "file", "filename", "annotations", "results")
    tb, found = error.__traceback__, None
    while tb is not None:
        for name in names:
            value = tb.tb_frame.f_locals.get(name)
            if isinstance(value, str) and value and os.path.isfile(os.path.expanduser(value)):
                found = value
                break
        tb = tb.tb_next
    if found:
        return found
    values = [v for k, v in vars(args).items() if not k.startswith("_") and isinstance(v, str)]
    values += [v for v in getattr(args, "opts", None) or [] if isinstance(v, str)]
    return next((v for v in values if v and os.path.isfile(os.path.expanduser(v))), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "_parser", None) is not None:
        pull_options(args._parser, args)
    try:
        check_file_arguments(args)
        set_threads(getattr(args, "threads", None))
        return int(args.func(args) or 0)
    except SurgDinoError as e:
        if debug:
            raise
        print(f"surgdino {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RecursionError as e:
        if debug:
            raise
        file = _file_being_read(e, args)
        where = f" in {file}" if file else " on the command line"
        print(f"surgdino {args.command}: error: a value{where} is nested too deeply to read (Python's "
              "recursion limit); flatten it", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"surgdino {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
