"""Convert a ConvNeXt checkpoint (official ImageNet, timm or ours) into our backbone weights or a detectron2 ``.pkl``.

``surgdino``: ``torch.save`` of the backbone state dict (``stem.*``, ``stages.*``), loadable with
``load_convnext_weights``. ``d2``: a pickle ``{"model": {"backbone.<name>": numpy}, "__author__": "surgdino",
"matching_heuristics": False}`` whose names match the full model, so ``MODEL.WEIGHTS x.pkl`` loads it.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from surgdino.engine.checkpointer import atomic_write
from surgdino.errors import CheckpointError
from surgdino.modeling.backbone.convnext import (
    ConvNeXtBackbone,
    infer_convnext_arch,
    read_weights_file,
    size_name,
    to_surgdino_convnext,
)

FORMATS = ("surgdino", "d2")


def convert_convnext(source: str, output: str, format: str | None = None) -> dict[str, Any]:
    """Convert ``source`` to ``output`` (format from the argument, else ``.pkl`` → d2, anything else → surgdino).

    Checks the result by loading it strictly into a ConvNeXt of the inferred size. Returns a summary:
    ``{"output", "format", "depths", "dims", "size" (e.g. "tiny" or None), "tensors", "dropped"}``.
    """
    fmt = format or ("d2" if output.endswith(".pkl") else "surgdino")
    if fmt not in FORMATS:
        raise CheckpointError(f"--format {fmt!r} is not known; use one of {list(FORMATS)}")
    state = read_weights_file(source)
    try:
        weights, dropped = to_surgdino_convnext(state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    depths, dims = infer_convnext_arch(weights)
    if 0 in depths or "stem.0.weight" not in weights:
        raise CheckpointError(f"{source}: incomplete ConvNeXt weights (blocks per stage {depths}, stem "
                              f"{'present' if 'stem.0.weight' in weights else 'missing'}); is the file complete?")
    has_gamma = any(k.endswith(".gamma") for k in weights)
    model = ConvNeXtBackbone(depths=depths, dims=dims, layer_scale_init_value=1e-6 if has_gamma else 0.0)
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("norm")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source}: does not match a ConvNeXt with depths {depths} dims {dims}: "
                              f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    weights = {k: v.detach().contiguous() for k, v in weights.items()}
    if fmt == "surgdino":
        atomic_write(output, lambda f: torch.save(weights, f))
    else:
        payload = {"model": {f"backbone.{k}": v.numpy() for k, v in weights.items()},
                   "__author__": "surgdino", "matching_heuristics": False}
        atomic_write(output, lambda f: pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL))
    return {"output": output, "format": fmt, "depths": depths, "dims": dims, "size": size_name(depths, dims),
            "tensors": len(weights), "dropped": dropped}
