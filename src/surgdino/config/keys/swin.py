"""Keys of the Swin backbones: ``D2SwinTransformer`` (MaskDINO's names, all keys) and ``swin_{tiny,small,base,large}``
(GroundingDINO presets: only DROP_PATH_RATE, OUT_FEATURES and PRETRAIN_IMG_SIZE apply)."""

from surgdino.config.core import declare as d

w = "MODEL.SWIN."
d(w + "PRETRAIN_IMG_SIZE", 224, "int", "Image size of the Swin pre-training (presets: 224 = window 7, 384 = window 12; "
  "D2SwinTransformer: recorded only, the window is WINDOW_SIZE).")
d(w + "PATCH_SIZE", 4, "int", "D2SwinTransformer: patch size of the patch embedding (res2 stride; 4 in every released model).")
d(w + "EMBED_DIM", 96, "int", "D2SwinTransformer: width of stage 1 (doubles each stage): T/S 96, B 128, L 192.")
d(w + "DEPTHS", [2, 2, 6, 2], "list[int]", "D2SwinTransformer: blocks per stage: T [2,2,6,2]; S, B, L [2,2,18,2].")
d(w + "NUM_HEADS", [3, 6, 12, 24], "list[int]", "D2SwinTransformer: attention heads per stage: T/S [3,6,12,24], B [4,8,16,32], L [6,12,24,48].")
d(w + "WINDOW_SIZE", 7, "int", "D2SwinTransformer: attention window (7 for 224 pre-training, 12 for 384); feature maps are padded to multiples of it, as officially.")
d(w + "MLP_RATIO", 4.0, "float", "D2SwinTransformer: MLP width / block width.")
d(w + "QKV_BIAS", True, "bool", "D2SwinTransformer: biases on the query, key and value projections.")
d(w + "QK_SCALE", 0.0, "float", "D2SwinTransformer: attention scale; 0 = head_dim ** -0.5 (the official None).")
d(w + "DROP_RATE", 0.0, "float", "D2SwinTransformer: dropout after the patch embedding, the attention output and the MLP (training only).")
d(w + "ATTN_DROP_RATE", 0.0, "float", "D2SwinTransformer: dropout of attention weights (training only).")
d(w + "DROP_PATH_RATE", 0.2, "float", "Stochastic depth rate, rising linearly over the blocks (0.2 as GroundingDINO; official MaskDINO Swin-L configs set 0.3).")
d(w + "APE", False, "bool", "D2SwinTransformer: absolute position embedding; only False (no released model uses it).")
d(w + "PATCH_NORM", True, "bool", "D2SwinTransformer: LayerNorm after the patch embedding.")
d(w + "OUT_FEATURES", ["res2", "res3", "res4", "res5"], "list[str]", "Swin stages returned (strides 4, 8, 16, 32), each after its output LayerNorm (norm0..norm3).")
d(w + "USE_CHECKPOINT", False, "bool", "D2SwinTransformer: recompute block activations in backward to save memory (training only, same gradients).")


def _check_swin(cfg) -> None:
    from surgdino.errors import ConfigError

    if cfg.MODEL.SWIN.APE:
        raise ConfigError("MODEL.SWIN.APE = True (absolute position embedding) is not supported: no released Swin or "
                          "MaskDINO checkpoint uses it; set it to False")


def _register() -> None:
    from surgdino.config.validate import register_check

    register_check(_check_swin)


_register()
