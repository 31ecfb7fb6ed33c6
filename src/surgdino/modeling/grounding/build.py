"""``GroundingDINO.from_config``: config keys (``MODEL.GDINO.*``) → the detector, its text encoder,
matcher, criterion and post-processing."""

from __future__ import annotations

from surgdino.errors import ConfigError
from surgdino.modeling.backbone import build_backbone
from surgdino.modeling.grounding.postprocess import GroundingPostProcessor
from surgdino.modeling.grounding.text_encoders import text_encoder_from_config
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.matcher import HungarianMatcher


def in_features_for(indices: list[int], shapes: dict) -> list[str]:
    """``RETURN_INTERM_INDICES`` (0 = res2 … 3 = res5) → backbone feature names. A backbone with fewer
    than four levels provides the coarsest ones (a single-scale ViT's one map is index 3)."""
    names = sorted(shapes, key=lambda n: shapes[n].stride)
    offset = 4 - len(names)
    bad = [i for i in indices if not offset <= i <= 3]
    if bad or not indices or sorted(set(indices)) != list(indices):
        raise ConfigError(f"MODEL.GDINO.RETURN_INTERM_INDICES = {list(indices)}: this backbone has levels "
                          f"{list(range(offset, 4))} ({names}); give increasing indices among them, e.g. [{3}]")
    return [names[i - offset] for i in indices]


def token_criterion(*, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                    cls_loss_coef: float = 2.0, bbox_loss_coef: float = 5.0, giou_loss_coef: float = 2.0,
                    interm_loss_coef: float = 1.0, no_interm_box_loss: bool = False, aux_loss: bool = True,
                    focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> SetCriterion:
    """The shared matcher and criterion on token maps: focal token cost/loss (targets' ``class_vectors``,
    the outputs' ``logit_mask``), box L1 and GIoU; no mask terms."""
    matcher = HungarianMatcher(cost_class=cost_class, cost_mask=0.0, cost_dice=0.0, cost_box=cost_bbox,
                               cost_giou=cost_giou, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    return SetCriterion(num_classes=0, matcher=matcher, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                        weight_dict={"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef},
                        dn="box", deep_supervision=aux_loss, interm_weight=interm_loss_coef,
                        interm_box_loss=not no_interm_box_loss)


def grounding_dino_kwargs(cfg) -> dict:
    g = cfg.MODEL.GDINO
    if g.DN_NUMBER < 0:
        raise ConfigError(f"MODEL.GDINO.DN_NUMBER = {g.DN_NUMBER}: give 0 (off, the default) or a query budget > 0")
    if g.ENC_LOSS_COEF != 1.0:
        raise ConfigError("MODEL.GDINO.ENC_LOSS_COEF has no effect in GroundingDINO (the reference builds no "
                          "enc_outputs); the selected proposals' losses use INTERM_LOSS_COEF; leave it 1.0")
    backbone = build_backbone(cfg)
    in_features = in_features_for(list(g.RETURN_INTERM_INDICES), backbone.output_shape())
    text_encoder = text_encoder_from_config(cfg)
    criterion = token_criterion(
        cost_class=g.SET_COST_CLASS, cost_bbox=g.SET_COST_BBOX, cost_giou=g.SET_COST_GIOU,
        cls_loss_coef=g.CLS_LOSS_COEF, bbox_loss_coef=g.BBOX_LOSS_COEF, giou_loss_coef=g.GIOU_LOSS_COEF,
        interm_loss_coef=g.INTERM_LOSS_COEF, no_interm_box_loss=g.NO_INTERM_BOX_LOSS, aux_loss=g.AUX_LOSS,
        focal_alpha=g.FOCAL_ALPHA, focal_gamma=g.FOCAL_GAMMA)
    return dict(
        backbone=backbone, in_features=in_features, text_encoder=text_encoder, text_dim=text_encoder.hidden_size,
        num_feature_levels=g.NUM_FEATURE_LEVELS, hidden_dim=g.HIDDEN_DIM, nheads=g.NHEADS,
        dim_feedforward=g.DIM_FEEDFORWARD, enc_layers=g.ENC_LAYERS, dec_layers=g.DEC_LAYERS,
        num_queries=g.NUM_QUERIES, enc_n_points=g.ENC_N_POINTS, dec_n_points=g.DEC_N_POINTS, dropout=g.DROPOUT,
        activation=g.ACTIVATION, pe_temperature=g.PE_TEMPERATURE, embed_init_tgt=g.EMBED_INIT_TGT,
        two_stage_bbox_embed_share=g.TWO_STAGE_BBOX_EMBED_SHARE, dec_pred_bbox_embed_share=g.DEC_PRED_BBOX_EMBED_SHARE,
        max_text_len=g.MAX_TEXT_LEN, use_text_enhancer=g.USE_TEXT_ENHANCER, use_fusion_layer=g.USE_FUSION_LAYER,
        use_text_cross_attention=g.USE_TEXT_CROSS_ATTENTION, text_dropout=g.TEXT_DROPOUT,
        fusion_dropout=g.FUSION_DROPOUT, fusion_droppath=g.FUSION_DROPPATH,
        sub_sentence_present=g.SUB_SENTENCE_PRESENT, dn_number=g.DN_NUMBER, dn_box_noise_scale=g.DN_BOX_NOISE_SCALE,
        dn_label_noise_ratio=g.DN_LABEL_NOISE_RATIO, prompt_mode=g.PROMPT_MODE, class_names=list(g.CLASS_NAMES),
        criterion=criterion, postprocessor=GroundingPostProcessor(num_select=g.NUM_SELECT,
                                                                  score_threshold=cfg.TEST.SCORE_THRESHOLD),
        pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD, size_divisibility=cfg.INPUT.SIZE_DIVISIBILITY)
