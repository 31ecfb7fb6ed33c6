"""``surgdino convert maskdino``: an official IDEA-Research/MaskDINO checkpoint (``.pth`` or detectron2 ``.pkl``)
→ our layout, with the report of what was used (``modeling.maskdino.official_weights``)."""

from __future__ import annotations

import os

import torch

from surgdino.checkpoint_io import load_file
from surgdino.errors import CheckpointError
from surgdino.modeling.maskdino.official_weights import OfficialReport, convert_official


def convert_maskdino(source: str, output: str, model_state: dict[str, torch.Tensor] | None = None
                     ) -> tuple[str, OfficialReport, list[str]]:
    """Write ``{"model": weights}`` with our names to ``output`` (atomically); returns the output path, the
    report and its lines (with the model tensors left unfilled when ``model_state`` is given)."""
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: not found; give the official checkpoint (e.g. maskdino_r50_50ep_300q_hid1024_3sd1_instance_maskenhance_mask46.1ap_box51.5ap.pth)")
    obj = load_file(source)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a checkpoint dict")
    state, report = convert_official(obj, source)
    tmp = output + ".tmp"
    torch.save({"model": state}, tmp)
    os.replace(tmp, output)
    return output, report, report.lines(model_state)
