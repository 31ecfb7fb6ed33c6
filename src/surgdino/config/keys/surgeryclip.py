"""Keys of the SurgeryCLIP (CLIP Surgery ViT) backbone, selected by ``MODEL.BACKBONE.NAME surgeryclip``."""

from surgdino.config.core import declare as d

s = "MODEL.SURGERYCLIP."
d(s + "CKPT", "", "str",
  "CLIP ViT checkpoint: OpenAI TorchScript archive or state dict, open_clip or RemoteCLIP state dict "
  "(flat or under state_dict/model, with or without module.); shape read from the keys.")
d(s + "SURGERY_DEPTH", 6, "int", "CLIP Surgery's v-v attention path in the last this many blocks (0 = plain CLIP).")
d(s + "ACT", "auto", "str",
  "MLP activation: auto (= quick_gelu: OpenAI weights and fine-tunes of them such as RemoteCLIP), quick_gelu, "
  "gelu (open_clip models trained from scratch, e.g. LAION ViT-B-32).",
  choices=["auto", "quick_gelu", "gelu"])
d(s + "FEATURES", "width", "str",
  "Backbone features: width (patch tokens before ln_post, e.g. 768 for ViT-B) or projected (after ln_post and proj, e.g. 512).",
  choices=["width", "projected"])
d(s + "INPUT_NORM", "imagenet", "str",
  "Normalisation of the images reaching the backbone, re-normalised to CLIP mean/std inside: imagenet "
  "(with MODEL.PIXEL_MEAN/PIXEL_STD), raw (0..255), unit (0..1), clip (already CLIP-normalised).",
  choices=["imagenet", "raw", "unit", "clip"])
d(s + "TRAINABLE_BLOCKS", 0, "int",
  "Trainable CLIP blocks counted from the last: 0 = CLIP frozen, -1 = all trainable, K = last K "
  "(the pyramid always trains; the last block's FFN feeds only CLS and stays frozen under surgery).")
d(s + "MULTI_SCALE", False, "bool",
  "Return a ViTDet simple feature pyramid (strides p/2, p, 2p, 4p: 8/16/32/64 for patch 16) instead of the single stride-p map.")
d(s + "OUT_CHANNELS", 256, "int", "Channels of the feature pyramid levels (MULTI_SCALE only).")
d(s + "POS_INTERP", "bilinear", "str",
  "Position-embedding interpolation for token grids other than the pre-training one: bilinear "
  "(align_corners False, as CLIP Surgery) or bicubic (antialiased, as open_clip's resize_pos_embed).",
  choices=["bilinear", "bicubic"])
d(s + "HEADS", 0, "int", "Attention heads of the CLIP image tower; 0 = width / 64 (every OpenAI/open_clip ViT).")
