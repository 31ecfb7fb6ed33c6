"""What a SurgDINO ONNX file carries besides its graph: ONNX ``metadata_props`` (string → string).

Everything ``Predictor("model.onnx")`` and ``surgdino predict --onnx`` need is here, so no config
file travels with the model: preprocessing (test resize, channel order, size divisibility, the fixed
input size), the post-processor's settings, class names, dataset category ids, and the full
merged config (YAML) and weights file it came from, for the record.
"""

from __future__ import annotations

import json
from typing import Any

from surgdino.errors import SurgDinoError

FORMAT = "surgdino-onnx/1"
KEYS = ("surgdino.format", "surgdino.preprocess", "surgdino.postprocess", "surgdino.class_names",
        "surgdino.config")
OPTIONAL = ("surgdino.dataset_ids", "surgdino.weights", "surgdino.version", "surgdino.kind")
KINDS = ("instances", "grounding")  # MaskDINO / DI-MaskDINO; GroundingDINO with a fixed class list
INPUTS = ("images", "pad_mask")
# The graph's contract, also written into the file's doc string.
GRAPH_DOC = ("inputs: images uint8 [B, 3, H, W] pixel values in the channel order of preprocess.format, resized "
             "like evaluation and padded bottom/right (pad value ignored); pad_mask bool [B, H, W], True = padding. "
             "B, H, W are fixed (preprocess.height/width, batch 1) or, for a dynamic export (preprocess.height null), "
             "free with H, W >= preprocess.min_side and multiples of preprocess.size_divisibility. "
             "Normalisation ((x - mean) / std, padding set to 0) is inside the graph. outputs: pred_logits [B, Q, C], "
             "pred_boxes [B, Q, 4] (cxcywh normalised to each image's unpadded extent), pred_embeds [B, Q, D], "
             "mask_features [B, D, H/4, W/4] (kind instances) or pred_logits [B, Q, T] token logits of the baked-in class-name "
             "prompt and pred_boxes [B, Q, 4] (kind grounding); post-processing is outside (surgdino.deploy.postprocess).")


def build(*, preprocess: dict[str, Any], postprocess: dict[str, Any], class_names: list[str], config_yaml: str,
          dataset_ids: dict[int, int] | None, weights: str, version: str, kind: str = "instances") -> dict[str, str]:
    """The ``metadata_props`` of an export (all values strings; structured ones JSON)."""
    return {"surgdino.format": FORMAT, "surgdino.kind": kind, "surgdino.preprocess": json.dumps(preprocess),
            "surgdino.postprocess": json.dumps(postprocess), "surgdino.class_names": json.dumps(list(class_names)),
            "surgdino.config": config_yaml, "surgdino.dataset_ids": json.dumps(dataset_ids or {}),
            "surgdino.weights": weights, "surgdino.version": version}


def parse(path: str, props: dict[str, str]) -> dict[str, Any]:
    """Validated metadata of the ONNX file ``path``: a file not exported by ``surgdino export`` (or by a
    version with another format) is one ``SurgDinoError`` that names what is missing."""
    missing = [k for k in KEYS if k not in props]
    if missing:
        what = "no surgdino metadata at all" if len(missing) == len(KEYS) else "missing metadata " + ", ".join(missing)
        raise SurgDinoError(f"{path}: not a SurgDINO ONNX export ({what}); export the model with `surgdino export "
                            "--config-file CONFIG MODEL.WEIGHTS model.pth --output model.onnx`")
    if props["surgdino.format"] != FORMAT:
        raise SurgDinoError(f"{path}: metadata surgdino.format is {props['surgdino.format']!r}, this surgdino reads "
                            f"{FORMAT!r}; re-export the model with this version's `surgdino export`")
    kind = props.get("surgdino.kind", "instances")
    if kind not in KINDS:
        raise SurgDinoError(f"{path}: metadata surgdino.kind is {kind!r}, this surgdino reads {', '.join(KINDS)}; "
                            "re-export the model with this version's `surgdino export`")
    out: dict[str, Any] = {"config": props["surgdino.config"], "weights": props.get("surgdino.weights", ""),
                           "version": props.get("surgdino.version", ""), "kind": kind}
    for key, field in (("surgdino.preprocess", "preprocess"), ("surgdino.postprocess", "postprocess"),
                       ("surgdino.class_names", "class_names"), ("surgdino.dataset_ids", "dataset_ids")):
        try:
            out[field] = json.loads(props.get(key, "{}"))
        except json.JSONDecodeError:
            raise SurgDinoError(f"{path}: metadata {key} is not valid JSON; re-export the model") from None
    need = {"preprocess": ("min_size", "max_size", "format", "size_divisibility", "height", "width"),
            "postprocess": ("box_threshold", "positive_map") if kind == "grounding" else
            ("detections_per_image", "score_threshold", "one_label_per_query", "overlap_threshold")}
    for field, names in need.items():
        gone = [n for n in names if n not in out[field]]
        if gone:
            raise SurgDinoError(f"{path}: metadata surgdino.{field} lacks {', '.join(gone)}; re-export the model "
                                "with this version's `surgdino export`")
    out["dataset_ids"] = {int(k): int(v) for k, v in out["dataset_ids"].items()}
    return out
