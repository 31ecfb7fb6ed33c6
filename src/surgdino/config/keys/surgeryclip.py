"""Keys of the SurgeryCLIP (CLIP Surgery ViT) backbone."""

from surgdino.config.core import declare as d

s = "MODEL.SURGERYCLIP."
d(s + "CKPT", "", "str", "CLIP checkpoint: OpenAI TorchScript or state dict, open_clip or RemoteCLIP state dict.")
d(s + "SURGERY_DEPTH", 6, "int", "CLIP Surgery is applied to the last this many blocks (0 = plain CLIP).")
d(s + "ACT", "auto", "str", "MLP activation: auto (QuickGELU for OpenAI-derived weights), quick_gelu, gelu.",
  choices=["auto", "quick_gelu", "gelu"])
d(s + "FEATURES", "width", "str", "Backbone features: width (tokens before ln_post) or projected (after ln_post and proj).",
  choices=["width", "projected"])
d(s + "INPUT_NORM", "imagenet", "str",
  "How images arriving at the backbone are normalised (re-normalised to CLIP mean/std inside): imagenet, raw (0..255), unit (0..1), clip (already CLIP).",
  choices=["imagenet", "raw", "unit", "clip"])
d(s + "TRAINABLE_BLOCKS", 0, "int", "Trainable transformer blocks counted from the last: 0 = frozen, -1 = all trainable, K = last K.")
d(s + "MULTI_SCALE", False, "bool", "Return a simple feature pyramid (strides 8/16/32/64) instead of the single stride-16 map.")
d(s + "OUT_CHANNELS", 256, "int", "Channels of the feature pyramid levels (MULTI_SCALE only).")
