"""CQU-ADHRI-Lab/DI-MaskDINO checkpoints (and the Hello2015 ConvNeXt fork's) ⇄ our names: MaskDINO's map
(``official_weights.MASKDINO``) plus the De-Imbalance (``oldm``) and BATO tensors, for a model built with
``MODEL.MaskDINO.DI_DESIGN official``.

Official → ours: ``oldm.layers.N`` → ``decoder.ti_layers.N``; ``oldm.ref_point_head`` → ``ti_ref_point_head``;
``oldm_norm`` → ``ti_norm``; ``_oldm_bbox_embed`` → ``ti_bbox_embed``; ``query_guide_feature_update``
(``multihead_attn`` → ``cross_attn``) → ``bato_update``; ``decoder.mask_output_conv`` (conv, ``norm``) →
``bato_mask_conv``, ``bato_mask_norm``.

Tied copies (the same module saved under several names): ``oldm.norm`` is ``oldm_norm``; ``oldm_bbox_embed.T``
and ``oldm.bbox_embed.T`` (one per TI layer T) are ``_oldm_bbox_embed``; ``oldm.class_embed`` and
``decoder.class_embed`` are ``class_embed``; ``decoder.mask_embed`` is ``mask_embed``;
``decoder.query_guide_feature_update`` is ``query_guide_feature_update``. Writing back fills one copy per TI
layer (``{t}``), which the MaskDINO framework's per-decoder-layer ``{j}`` cannot express, hence
``DIKeyMap.to_official``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch

from surgdino.modeling.maskdino.official_weights import (
    MASKDINO,
    PR,
    KeyMap,
    Rule,
    Tie,
    register_official_map,
)

_TI_TIES = (("oldm_bbox_embed.{t}.{x*}", "_oldm_bbox_embed."), ("oldm.bbox_embed.{t}.{x*}", "_oldm_bbox_embed."))


@dataclasses.dataclass(frozen=True)
class DIKeyMap(KeyMap):
    """``KeyMap`` whose ``to_official`` also writes the per-TI-layer copies of the TI box head."""

    def to_official(self, state: Mapping[str, torch.Tensor], **options: Any) -> dict[str, torch.Tensor]:
        """``KeyMap.to_official`` (``options``: ``feature_order``; DI-MaskDINO's configs use low2high), then the
        TI box head's copies, one per TI layer."""
        per_layer = dataclasses.replace(self, ties=tuple(t for t in self.ties if "{t}" not in t.copy))
        out = KeyMap.to_official(per_layer, state, **options)
        n_ti = len({m.group(1) for k in state if (m := re.match(r"decoder\.ti_layers\.(\d+)\.", k))})
        for k in [k for k in out if k.startswith(PR + "_oldm_bbox_embed.")]:
            rest = k[len(PR + "_oldm_bbox_embed."):]
            for t in range(n_ti):
                out[f"{PR}oldm_bbox_embed.{t}.{rest}"] = out[k]
                out[f"{PR}oldm.bbox_embed.{t}.{rest}"] = out[k]
        return out


_base = MASKDINO.extended(
    rules=[
        Rule(PR + "oldm.layers.{i}.{x*}", "decoder.ti_layers.{i}.{x*}"),
        Rule(PR + "oldm.ref_point_head.{x*}", "decoder.ti_ref_point_head.{x*}"),
        Rule(PR + "oldm_norm.{p}", "decoder.ti_norm.{p}"),
        Rule(PR + "_oldm_bbox_embed.{x*}", "decoder.ti_bbox_embed.{x*}"),
        Rule(PR + "query_guide_feature_update.multihead_attn.{x*}", "decoder.bato_update.cross_attn.{x*}"),
        Rule(PR + "query_guide_feature_update.{x*}", "decoder.bato_update.{x*}"),
        Rule(PR + "decoder.mask_output_conv.norm.{p}", "decoder.bato_mask_norm.{p}"),
        Rule(PR + "decoder.mask_output_conv.weight", "decoder.bato_mask_conv.weight"),
    ],
    ties=[
        Tie(PR + "oldm.norm.{p}", PR + "oldm_norm.{p}"),
        Tie(PR + "oldm.class_embed.{p}", PR + "class_embed.{p}"),
        Tie(PR + "decoder.class_embed.{p}", PR + "class_embed.{p}"),
        Tie(PR + "decoder.mask_embed.{x*}", PR + "mask_embed.{x*}"),
        Tie(PR + "decoder.query_guide_feature_update.{x*}", PR + "query_guide_feature_update.{x*}"),
        *(Tie(PR + copy, PR + canon + "{x*}") for copy, canon in _TI_TIES),
    ],
)
DIMASKDINO = DIKeyMap(**{f.name: getattr(_base, f.name) for f in dataclasses.fields(KeyMap)})


def is_official_dimaskdino(state: Mapping[str, Any]) -> bool:
    """An official DI-MaskDINO state: it has the De-Imbalance module's tensors."""
    return any(isinstance(k, str) and k.startswith(PR + "oldm.") for k in state)


register_official_map(is_official_dimaskdino, DIMASKDINO)

# Hello2015/DI-MaskDINO's D2ConvNeXt keeps the official ConvNeXt names (``downsample_layers.N``, ``stages.N.M``,
# ``dwconv``/``pwconv1``/``pwconv2``, out norms ``normN``); ours are timm's (``stem``, ``stages.N.downsample``,
# ``stages.N.blocks.M``, ``conv_dw``/``mlp.fc1``/``mlp.fc2``). The same renames as ``convnext.to_surgdino_convnext``.
_b = "backbone."
_convnext = DIMASKDINO.extended(rules=[
    Rule(_b + "downsample_layers.0.{x*}", _b + "stem.{x*}"),
    Rule(_b + "downsample_layers.{i}.{x*}", _b + "stages.{i}.downsample.{x*}"),
    Rule(_b + "stages.{i}.{j}.dwconv.{p}", _b + "stages.{i}.blocks.{j}.conv_dw.{p}"),
    Rule(_b + "stages.{i}.{j}.pwconv1.{p}", _b + "stages.{i}.blocks.{j}.mlp.fc1.{p}"),
    Rule(_b + "stages.{i}.{j}.pwconv2.{p}", _b + "stages.{i}.blocks.{j}.mlp.fc2.{p}"),
    Rule(_b + "stages.{i}.{j}.{x*}", _b + "stages.{i}.blocks.{j}.{x*}"),
])
DIMASKDINO_CONVNEXT = DIKeyMap(**{f.name: getattr(_convnext, f.name) for f in dataclasses.fields(KeyMap)})


def is_official_dimaskdino_convnext(state: Mapping[str, Any]) -> bool:
    """An official DI-MaskDINO state with the official ConvNeXt backbone names (the Hello2015 fork)."""
    return is_official_dimaskdino(state) and any(isinstance(k, str) and k.startswith(_b + "downsample_layers.")
                                                 for k in state)


register_official_map(is_official_dimaskdino_convnext, DIMASKDINO_CONVNEXT)
