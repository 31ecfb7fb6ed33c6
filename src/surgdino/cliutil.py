"""Argument helpers shared by the command modules (``surgdino/<package>/cli.py``).

Layering: the top-level ``surgdino.cli`` imports the command modules, and they import this module,
never ``surgdino.cli``. Nothing here imports torch, so ``surgdino --help`` and argument errors
stay fast.
"""

from __future__ import annotations

import argparse
import os
import re

# A config key on the command line: ``SOLVER.BASE_LR``, ``MODEL.MaskDINO.DEC_LAYERS``.
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+$")
# Arguments naming a file (a folder there is a mistake worth its own message).
FILE_ARGUMENTS = ("config_file", "annotations", "results", "source")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """Trailing detectron2-style ``KEY VALUE`` overrides; options may still follow them."""
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides after the options, e.g. SOLVER.BASE_LR 2e-4 MODEL.WEIGHTS w.pth")
    parser.set_defaults(_parser=parser)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = False, threads: bool = True) -> None:
    """``--config-file X`` (a path or a packaged ``surgdino://NAME``), ``--threads N`` and trailing
    ``KEY VALUE`` overrides."""
    parser.add_argument("--config-file", metavar="FILE", required=required, default=None,
                        help="YAML config (with _BASE_ inheritance): a path or a packaged config by name, "
                             "e.g. surgdino://demo/dimaskdino_atto_trays.yaml (list: surgdino config list)")
    if threads:
        add_threads_argument(parser)
    add_overrides(parser)


IDLE_LOAD = 0.5  # 1-minute load average under which "auto" takes every core


def add_threads_argument(parser: argparse.ArgumentParser, default: int | str | None = None) -> None:
    """``--threads N`` (or ``auto``): CPU threads of this process (torch intra-op and inter-op)."""
    if any("--threads" in a.option_strings for a in parser._actions):
        return
    shown = {None: "torch's default: one per core, or OMP_NUM_THREADS",
             "auto": f"auto: every core when the 1-minute load average is below {IDLE_LOAD}, else 1"}.get(default, default)
    parser.add_argument("--threads", type=threads_value, default=default, metavar="N",
                        help=f"CPU threads for this process (torch intra- and inter-op; default {shown}). "
                             "On a shared machine 1 is often faster than 2")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def threads_value(text: str) -> int | str:
    """``--threads``: a positive whole number, or ``auto``."""
    return "auto" if text == "auto" else positive_int(text)


def auto_threads() -> int:
    """Every core on an idle machine, else 1: on 2 cores the demo model steps 1.3-1.4x faster on 2 threads
    than on 1 when nothing else runs, and ~7x slower on 2 than on 1 when another job shares the cores."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1
    return (os.cpu_count() or 1) if load < IDLE_LOAD else 1


def set_threads(n: int | str | None) -> None:
    """Use ``n`` CPU threads (``auto``: ``auto_threads()``) in this process and in the processes it starts
    (no-op for None)."""
    if not n:
        return
    if n == "auto":
        n = auto_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)  # worker and DDP processes read it when torch starts
    os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel work; a second call in one process
        pass


def pull_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options written after the first ``KEY VALUE`` pair land in ``args.opts`` (argparse REMAINDER);
    parse those ``parser`` knows onto ``args``, with the same conversion and errors as before the
    pairs (``parser.error``: usage and exit code 2), so an option works anywhere on the line."""
    known = {s: a for a in parser._actions for s in a.option_strings}
    rest: list[str] = []
    opts = list(getattr(args, "opts", None) or [])
    i = 0
    while i < len(opts):
        tok = opts[i]
        name, eq, inline = tok.partition("=")
        action = known.get(name) if tok.startswith("-") else None
        if tok == "--debug":  # the top-level flag, written after the command
            i += 1
            continue
        if action is None:
            if tok.startswith("--") and not _is_value(rest):
                close = [s for s in known if s.startswith(name[:4])]
                parser.error(f"unrecognized argument: {tok}" + (f" (options: {', '.join(sorted(close))})"
                                                                 if close else ""))
            rest.append(tok)
            i += 1
            continue
        if isinstance(action, argparse._HelpAction):
            parser.print_help()
            parser.exit(0)
        if action.nargs == 0:
            setattr(args, action.dest, action.const if action.const is not None else True)
            i += 1
            continue
        if eq:
            raws, i = [inline], i + 1
        elif action.nargs in ("+", "*"):
            j = i + 1
            while j < len(opts) and not opts[j].startswith("-") and not _KEY.match(opts[j]):
                j += 1
            raws, i = opts[i + 1:j], j
            if not raws and action.nargs == "+":
                parser.error(f"argument {name}: expected at least one argument")
        elif i + 1 < len(opts):
            raws, i = [opts[i + 1]], i + 2
        else:
            parser.error(f"argument {name}: expected one argument")
        values = []
        for raw in raws:
            try:
                value = parser._get_value(action, raw)
                parser._check_value(action, value)
            except argparse.ArgumentError as e:
                parser.error(str(e))
            values.append(value)
        setattr(args, action.dest, values if action.nargs in ("+", "*") or isinstance(action.nargs, int)
                else values[0])
    args.opts = rest


def _is_value(rest: list[str]) -> bool:
    """Whether the next token is the value of an override key (``KEY --x`` sets KEY to ``--x``)."""
    return len(rest) % 2 == 1


def check_file_arguments(args: argparse.Namespace) -> None:
    """A folder where a file is expected: say so (not "not found")."""
    from surgdino.errors import SurgDinoError

    for dest in FILE_ARGUMENTS:
        if dest in getattr(args, "folder_ok", ()):  # e.g. convert groundingdino --source: a transformers folder
            continue
        value = getattr(args, dest, None)
        if isinstance(value, str) and value and os.path.isdir(os.path.expanduser(value)):
            flag = "--" + dest.replace("_", "-")
            hint = ""
            try:
                inside = sorted(f for f in os.listdir(os.path.expanduser(value))
                                if f.endswith((".yaml", ".yml", ".json", ".pth", ".pkl", ".pt")))
            except OSError:
                inside = []
            if inside:
                hint = f"; e.g. {os.path.join(value, inside[0])}"
            raise SurgDinoError(f"{flag} {value} is a directory, not a file; give a file inside it{hint}")
