"""Layers shared by the pixel decoder and the decoders: deformable attention, position encodings, MLP."""

from surgdino.modeling.layers.misc import MLP, inverse_sigmoid
from surgdino.modeling.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn_core, spatial_shapes_as_list
from surgdino.modeling.layers.position_encoding import PositionEmbeddingSine, gen_sineembed_for_position

__all__ = [
    "MLP",
    "MSDeformAttn",
    "PositionEmbeddingSine",
    "gen_sineembed_for_position",
    "inverse_sigmoid",
    "ms_deform_attn_core",
    "spatial_shapes_as_list",
]
