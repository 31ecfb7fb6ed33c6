"""Detector-independent parts of the DINO family (MaskDINO, DI-MaskDINO, GroundingDINO).

Layering inside ``modeling``: ``layers`` (this package) ← ``pixel_decoder`` ← ``maskdino`` / ``grounding``.
Nothing here imports a detector. Modules:

* ``misc`` — MLP, inverse sigmoid, token gathering; ``position_encoding`` — sine encodings;
* ``geometry`` — box formats and IoUs, boxes of masks, valid ratios, reference points, encoder proposals;
* ``point_sampling`` — PointRend sampling of masks and features; ``masked_norm`` — padding-aware norm/conv;
* ``ms_deform_attn`` — multi-scale deformable attention;
* ``blocks`` — post-norm FFN/attention vocabulary and the encoder/decoder/self/cross-attention layers;
* ``deformable_encoder`` — flatten levels + positions + reference points + layer loop with a per-layer hook;
* ``box_refine`` — the iterative box-refinement decoder loop with explicit per-layer inputs;
* ``set_prediction`` — class targets (one-hot or per-target vectors, logit masks) for matching and focal loss.
"""

from surgdino.modeling.layers.misc import MLP, gather_tokens, inverse_sigmoid
from surgdino.modeling.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn_core, spatial_shapes_as_list
from surgdino.modeling.layers.position_encoding import PositionEmbeddingSine, gen_sineembed_for_position

__all__ = [
    "MLP",
    "MSDeformAttn",
    "PositionEmbeddingSine",
    "gather_tokens",
    "gen_sineembed_for_position",
    "inverse_sigmoid",
    "ms_deform_attn_core",
    "spatial_shapes_as_list",
]
