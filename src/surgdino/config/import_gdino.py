"""``surgdino config import-gdino FILE.py``: an Open-GroundingDino / GroundingDINO Python config → our YAML.

The file is read with ``ast`` and never executed: values may be literals (numbers, strings, None,
booleans, lists, tuples, dicts), simple arithmetic on numbers (``lr * 0.1``, ``-1``, ``2 ** 10``) and
names assigned earlier in the file; anything else (calls, attributes, imports, comprehensions, ...)
is reported as unsupported and its key left out. ``_base_`` files are read the same way, relative
to the file. Every key is mapped to a SurgDINO key, recognised as the only behaviour SurgDINO has
(nothing to set), or named with the reason it cannot be mapped.

The ``MODEL.GDINO.*`` keys are found from their docs, which end with the reference name in
brackets (``config/keys/grounding.py``); the others are in :data:`_SPECIAL` below.
"""

from __future__ import annotations

import argparse
import ast
import operator
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from surgdino.errors import ConfigError

_MAX_DEPTH = 8  # _base_ chains
_MAX_ELEMENTS = 100_000
_BIN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}


class Unsupported(Exception):
    """A value the safe reader does not evaluate."""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _evaluate(node: ast.AST, names: dict[str, Any]) -> Any:
    """Literals, containers, +-*/ //, %, ** on numbers, + on strings/lists, and earlier names; nothing else."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        raise Unsupported(f"constant of type {type(node.value).__name__}")
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        if len(node.elts) > _MAX_ELEMENTS:
            raise Unsupported("a container this large")
        return [_evaluate(e, names) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise Unsupported("dict unpacking (**)")
        try:
            return {_evaluate(k, names): _evaluate(v, names) for k, v in zip(node.keys, node.values)}
        except TypeError:
            raise Unsupported("a dict with a list as key") from None
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        raise Unsupported(f"the name {node.id!r} (not assigned before in the file)")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _evaluate(node.operand, names)
        if isinstance(node.op, ast.Not):
            return not v
        if not _number(v):
            raise Unsupported("a sign on a non-number")
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        a, b = _evaluate(node.left, names), _evaluate(node.right, names)
        if _number(a) and _number(b):
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise Unsupported("a power this large")
            try:
                return _BIN_OPS[type(node.op)](a, b)
            except (ZeroDivisionError, OverflowError) as e:
                raise Unsupported(f"arithmetic that fails ({e})") from None
        if isinstance(node.op, ast.Add) and type(a) is type(b) and isinstance(a, (str, list)):
            if len(a) + len(b) > _MAX_ELEMENTS:
                raise Unsupported("a value this large")
            return a + b
        raise Unsupported(f"{type(node.op).__name__} on {type(a).__name__} and {type(b).__name__}")
    raise Unsupported(f"a {type(node).__name__} expression")


@dataclass
class Reading:
    """Values read from a python config (with its _base_ chain) and what could not be read."""

    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)  # key → "file:line"
    unreadable: list[str] = field(default_factory=list)  # "file:line: what"


def read_python_config(path: str, _depth: int = 0) -> Reading:
    """Top-level assignments of ``path`` evaluated safely (see module doc); ``_base_`` files first."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"import-gdino: {path}: file not found")
    if _depth > _MAX_DEPTH:
        raise ConfigError(f"import-gdino: {path}: _base_ chain deeper than {_MAX_DEPTH}")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"import-gdino: {path}: not a readable Python file ({e})") from None
    out = Reading()
    name = os.path.basename(path)
    for stmt in tree.body:
        where = f"{name}:{stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        elif isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            targets, value = stmt.targets, stmt.value
        else:
            out.unreadable.append(f"{where}: a {type(stmt).__name__} statement is not read (only `name = value`)")
            continue
        try:
            v = _evaluate(value, out.values)
        except Unsupported as e:
            for t in targets:
                out.unreadable.append(f"{where}: {t.id}: {e} is not evaluated (files are read, never run)")
                out.values.pop(t.id, None)
            continue
        for t in targets:
            if t.id == "_base_":
                for base in [v] if isinstance(v, str) else list(v or []):
                    sub = read_python_config(os.path.join(os.path.dirname(path), str(base)), _depth + 1)
                    out.values.update(sub.values)
                    out.lines.update(sub.lines)
                    out.unreadable += sub.unreadable
                continue
            out.values[t.id] = v
            out.lines[t.id] = where
    return out


# Reference keys whose value is the only behaviour SurgDINO has: matching values need nothing.
_FIXED: dict[str, Any] = {
    "modelname": "groundingdino", "position_embedding": "sine", "pre_norm": False, "query_dim": 4,
    "num_patterns": 0, "two_stage_class_embed_share": False, "dec_pred_class_embed_share": True,
    "decoder_sa_type": "sa", "matcher_type": "HungarianMatcher", "decoder_module_seq": ["sa", "ca", "ffn"],
    "masks": False, "dilation": False, "frozen_weights": None, "random_refpoints_xy": False, "fix_refpoints_hw": -1,
    "dabdetr_yolo_like_anchor_update": False, "dabdetr_deformable_encoder": False, "dabdetr_deformable_decoder": False,
    "use_deformable_box_attn": False, "dec_layer_number": None, "decoder_layer_noise": False, "add_channel_attention": False,
    "add_pos_value": False, "two_stage_pat_embed": 0, "two_stage_add_query_num": 0, "two_stage_learn_wh": False,
    "two_stage_keep_all_tokens": False, "pdetr3_bbox_embed_diff_each_layer": False, "pdetr3_refHW": -1,
    "nms_iou_threshold": -1, "use_coco_eval": True, "use_detached_boxes_dec_out": False, "onecyclelr": False,
    "backbone_freeze_keywords": None, "batch_norm_type": "FrozenBatchNorm2d", "dn_label_coef": 1.0, "dn_bbox_coef": 1.0,
    "data_aug_scale_overlap": None, "match_unstable_error": True, "param_dict_type": "ddetr_in_mmdet",
    "ddetr_lr_param": False, "multi_step_lr": False, "box_attn_type": "roi_align", "dln_xy_noise": 0.2,
    "dln_hw_noise": 0.2, "two_stage_default_hw": 0.05, "mask_loss_coef": 1.0, "dice_loss_coef": 1.0,
}
# Reference keys that cannot be mapped, with the reason and the fix.
_NOT_MAPPED: dict[str, str] = {
    "epochs": "the schedule is in iterations: set SOLVER.MAX_ITER = epochs × images / SOLVER.IMS_PER_BATCH",
    "lr_drop": "the schedule is in iterations: set SOLVER.STEPS (iterations)",
    "lr_drop_list": "the schedule is in iterations: set SOLVER.STEPS (iterations)",
    "save_checkpoint_interval": "epochs: set SOLVER.CHECKPOINT_PERIOD (iterations)",
    "ema_epoch": "EMA starts at iteration 0",
    "max_labels": "captions hold every class name of the dataset (no sampling of negative names); with many classes use MODEL.GDINO.PROMPT_MODE pooled",
    "data_aug_scales2_resize": "DETR's resize-then-crop branch is not available; use INPUT.CROP.* or INPUT.DATASET_MAPPER_NAME",
    "data_aug_scales2_crop": "DETR's resize-then-crop branch is not available; use INPUT.CROP.*",
    "lr_linear_proj_mult": "no separate LR for sampling offsets / reference points",
    "lr_linear_proj_names": "no separate LR for sampling offsets / reference points",
    "use_checkpoint": "no gradient checkpointing in the Swin backbone",
    "use_transformer_ckpt": "no gradient checkpointing in the transformer",
    "dn_scalar": "unused by Open-GroundingDino (it builds the model with dn_number = 0); set MODEL.GDINO.DN_NUMBER",
    "label_list": "class names come from the dataset's categories (or predict --prompt)",
    "coco_val_path": "datasets are declared in DATASETS.REGISTER",
    "seed": "set SEED",
}
_BACKBONES = {"surgeryclip": "surgeryclip", "swin_T_224_1k": "swin_tiny", "swin_B_224_22k": "swin_base",
              "swin_B_384_22k": "swin_base"}


def _gdino_names() -> dict[str, str]:
    """Reference name → MODEL.GDINO key, from the ``[name]`` ending each key's doc."""
    from surgdino.config import schema

    out = {}
    for key in schema().values():
        m = re.search(r"\[(\w+)\]\s*$", key.doc)
        if m:
            out[m.group(1)] = key.name
    return out


@dataclass
class Imported:
    keys: dict[str, Any] = field(default_factory=dict)  # our dotted key → value
    fixed: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # "name = value: reason"
    notes: list[str] = field(default_factory=list)


def map_gdino(values: dict[str, Any]) -> Imported:
    """Map reference config values to SurgDINO keys (typed by the schema); name what cannot be mapped."""
    from surgdino.config import schema
    from surgdino.config.core import convert

    known = schema()
    direct = _gdino_names()
    out = Imported()
    done: set[str] = set()

    def put(key: str, value: Any, name: str) -> None:
        try:
            out.keys[key] = convert(known[key], value, source=f"import-gdino ({name})")
        except ConfigError as e:
            out.unmapped.append(f"{name} = {values.get(name)!r}: {e}")

    def skip(name: str, reason: str) -> None:
        out.unmapped.append(f"{name} = {values[name]!r}: {reason}")

    v = values.get
    out.keys["MODEL.META_ARCHITECTURE"] = "GroundingDINO"
    out.keys["MODEL.MASK_ON"] = False
    if "backbone" in values:
        done.add("backbone")
        b = str(values["backbone"])
        if b in _BACKBONES or b.startswith(("convnext", "resnet")):
            put("MODEL.BACKBONE.NAME", _BACKBONES.get(b, b), "backbone")
            if b.endswith("_384_22k"):
                put("MODEL.SWIN.PRETRAIN_IMG_SIZE", 384, "backbone")
        else:
            skip("backbone", f"no such backbone; one of {sorted(_BACKBONES)}, convnext_*")
    for name, key in (("surgeryclip_ckpt", "MODEL.SURGERYCLIP.CKPT"), ("device", "MODEL.DEVICE"),
                      ("lr", "SOLVER.BASE_LR"), ("weight_decay", "SOLVER.WEIGHT_DECAY"),
                      ("batch_size", "SOLVER.IMS_PER_BATCH"), ("use_ema", "MODEL_EMA.ENABLED"),
                      ("ema_decay", "MODEL_EMA.DECAY"), ("data_aug_max_size", "INPUT.MAX_SIZE_TRAIN")):
        if name in values:
            done.add(name)
            put(key, values[name], name)
    if "batch_size" in values:
        out.notes.append("batch_size is per process in Open-GroundingDino; SOLVER.IMS_PER_BATCH is the total over "
                         "all processes: multiply it by the number of GPUs")
    if "data_aug_scales" in values:
        done.add("data_aug_scales")
        put("INPUT.MIN_SIZE_TRAIN", values["data_aug_scales"], "data_aug_scales")
        out.keys["INPUT.MIN_SIZE_TRAIN_SAMPLING"] = "choice"
    if "train_surgeryclip_backbone" in values:
        done.add("train_surgeryclip_backbone")
        out.keys["MODEL.SURGERYCLIP.TRAINABLE_BLOCKS"] = -1 if values["train_surgeryclip_backbone"] else 0
    if "pe_temperatureH" in values or "pe_temperatureW" in values:
        done.update({"pe_temperatureH", "pe_temperatureW"})
        h, w = v("pe_temperatureH", v("pe_temperatureW")), v("pe_temperatureW", v("pe_temperatureH"))
        if h == w:
            put("MODEL.GDINO.PE_TEMPERATURE", h, "pe_temperatureH")
        else:
            out.unmapped.append(f"pe_temperatureH/W = {h!r}/{w!r}: one temperature for both axes (MODEL.GDINO.PE_TEMPERATURE)")
    if "text_encoder_type" in values:
        done.add("text_encoder_type")
        t = str(values["text_encoder_type"])
        put("MODEL.GDINO.TEXT_ENCODER.NAME", "bert", "text_encoder_type")
        if os.path.isdir(os.path.expanduser(t)) or os.sep in t and not t.startswith("bert-"):
            put("MODEL.GDINO.TEXT_ENCODER.PATH", t, "text_encoder_type")
        else:
            out.notes.append(f"text_encoder_type = {t!r} names a download: set MODEL.GDINO.TEXT_ENCODER.PATH to a local "
                             "copy of it (nothing is downloaded), or MODEL.GDINO.TEXT_ENCODER.NAME minilm (offline)")
    if "freeze_keywords" in values:
        done.add("freeze_keywords")
        words = list(values["freeze_keywords"] or [])
        put("MODEL.GDINO.TEXT_ENCODER.FREEZE", "bert" in words, "freeze_keywords")
        if "backbone.0" in words:
            if out.keys.get("MODEL.BACKBONE.NAME") == "surgeryclip":
                out.keys["MODEL.SURGERYCLIP.TRAINABLE_BLOCKS"] = 0
            else:
                out.keys["MODEL.BACKBONE.FREEZE_AT"] = 5
        rest = [w for w in words if w not in ("bert", "backbone.0")]
        if rest:
            out.unmapped.append(f"freeze_keywords {rest!r}: only 'bert' and 'backbone.0' can be frozen by config")
    if "lr_backbone" in values:
        done.update({"lr_backbone", "lr_backbone_names"})
        lr, names = v("lr", known["SOLVER.BASE_LR"].default), list(v("lr_backbone_names") or ["backbone.0"])
        mult = float(values["lr_backbone"]) / float(lr) if lr else 0.0
        if "backbone.0" in names:
            put("SOLVER.BACKBONE_MULTIPLIER", mult, "lr_backbone")
        if "bert" in names:
            put("MODEL.GDINO.TEXT_ENCODER.LR_MULT", mult, "lr_backbone")
        rest = [n for n in names if n not in ("bert", "backbone.0")]
        if rest:
            out.unmapped.append(f"lr_backbone_names {rest!r}: only backbone.0 and bert have their own LR")
    if "clip_max_norm" in values:
        done.add("clip_max_norm")
        c = values["clip_max_norm"]
        out.keys["SOLVER.CLIP_GRADIENTS.ENABLED"] = bool(c and c > 0)
        if c and c > 0:
            out.keys["SOLVER.CLIP_GRADIENTS.CLIP_TYPE"] = "full_model"
            put("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", c, "clip_max_norm")
            out.keys["SOLVER.CLIP_GRADIENTS.NORM_TYPE"] = 2.0
    if "use_dn" in values or "dn_number" in values:
        done.update({"use_dn", "dn_number"})
        put("MODEL.GDINO.DN_NUMBER", v("dn_number", 100) if v("use_dn", True) else 0, "dn_number")
    for name, value in values.items():
        if name in done:
            continue
        if name in direct:
            put(direct[name], value, name)
        elif name in _FIXED:
            if value == _FIXED[name]:
                out.fixed.append(name)
            else:
                out.unmapped.append(f"{name} = {value!r}: not supported (SurgDINO always uses {_FIXED[name]!r})")
        elif name in _NOT_MAPPED:
            skip(name, _NOT_MAPPED[name])
        else:
            skip(name, "no SurgDINO key for it")
    return out


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for k, value in flat.items():
        node = tree
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def import_gdino(path: str) -> tuple[str, Reading, Imported]:
    """YAML text for the python config ``path``, and what was read and mapped."""
    reading = read_python_config(path)
    imported = map_gdino(reading.values)
    head = [f"# Imported by `surgdino config import-gdino` from {os.path.abspath(path)} (read, never run)."]
    head += [f"# NOTE: {n}" for n in imported.notes]
    if reading.unreadable or imported.unmapped:
        head.append("# Not imported:")
        head += [f"#   {u}" for u in reading.unreadable + imported.unmapped]
    body = yaml.safe_dump(_nested(imported.keys), sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body, reading, imported


def register(csub: argparse._SubParsersAction) -> None:
    p = csub.add_parser("import-gdino", help="turn an Open-GroundingDino python config into our YAML (read, never run)",
                        description="Read FILE.py with ast (no code runs), map each key to SurgDINO's, name the rest.")
    p.add_argument("file", metavar="FILE.py", help="an Open-GroundingDino / GroundingDINO python config")
    p.add_argument("--output", "-o", metavar="X.yaml", help="where to write the YAML (default: print it)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    text, reading, imported = import_gdino(args.file)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, end="")
    n_unmapped = len(reading.unreadable) + len(imported.unmapped)
    summary = (f"{len(reading.values)} keys read: {len(imported.keys)} SurgDINO keys set, {len(imported.fixed)} "
               f"already SurgDINO's behaviour, {n_unmapped} not imported")
    print(summary + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    for line in imported.notes:
        print(f"  note: {line}", file=sys.stderr)
    for line in reading.unreadable + imported.unmapped:
        print(f"  not imported: {line}", file=sys.stderr)
    return 0
