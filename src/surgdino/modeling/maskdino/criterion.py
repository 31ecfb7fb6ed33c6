"""Set criterion: focal class, point-sampled mask BCE and dice, box L1 and GIoU on matched pairs,
for the final layer, every auxiliary layer, the encoder's selected queries and the denoising queries."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.modeling.layers.geometry import box_cxcywh_to_xyxy, pairwise_generalized_box_iou
from surgdino.modeling.layers.point_sampling import (
    draw_uncertain_candidates,
    pick_uncertain_points,
    point_sample,
    sample_binary_masks,
    uncertain_point_coords,
)
from surgdino.modeling.layers.set_prediction import class_target_tensor, focal_loss_sum, num_boxes
from surgdino.modeling.maskdino.matcher import HungarianMatcher

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over pairs of the point dice loss: ``logits, targets [K, P]``."""
    return pair_dice_loss(logits, targets).sum()


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over pairs of the mean point BCE: ``logits, targets [K, P]``."""
    return pair_sigmoid_ce_loss(logits, targets).sum()


def pair_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Point dice loss of each pair: ``logits, targets [K, P]`` → ``[K]``."""
    s = logits.sigmoid()
    num = 2 * (s * targets).sum(-1)
    den = s.sum(-1) + targets.sum(-1)
    return 1 - (num + 1) / (den + 1)


def pair_sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean point BCE of each pair: ``logits, targets [K, P]`` → ``[K]``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def _mask_point_losses(mask_logits: torch.Tensor, coords: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed point BCE and dice of ``mask_logits [K, h, w]`` read at ``coords [K, P, 2]`` against ``targets [K, P]``."""
    pl = point_sample(mask_logits[:, None], coords.to(mask_logits.dtype))[:, 0].float()  # [K, P]
    return sigmoid_ce_loss(pl, targets), dice_loss(pl, targets)


class _EagerGrad(torch.autograd.Function):
    """Scalar losses ``fn(x, *args)`` whose gradients w.r.t. ``x`` are computed in the forward and kept
    (one tensor of ``x``'s size per loss) instead of the losses' intermediates (point logits, sigmoids,
    sampling grids: several times ``x``'s size per layer, for every decoder layer until the backward).
    Same values and gradients as calling ``fn`` under autograd."""

    @staticmethod
    def forward(ctx, x, fn, *args):
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            outs = fn(xd, *args)
            grads = [torch.autograd.grad(o, xd, retain_graph=i + 1 < len(outs))[0] for i, o in enumerate(outs)]
        ctx.save_for_backward(*grads)
        ctx.num_args = len(args)
        return tuple(o.detach() for o in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        grad = None
        for go, g in zip(grad_outs, ctx.saved_tensors):
            grad = go * g if grad is None else grad + go * g
        return (grad, None) + (None,) * ctx.num_args


def _eager(fn, x: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerGrad.apply(x, fn, *args)
    return fn(x, *args)


def _pair_point_losses(mask_logits: torch.Tensor, coords: torch.Tensor, targets: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair point BCE and dice ``[K]`` of ``mask_logits [K, h, w]`` at ``coords [K, P, 2]``."""
    pl = point_sample(mask_logits[:, None], coords.to(mask_logits.dtype))[:, 0].float()  # [K, P]
    return pair_sigmoid_ce_loss(pl, targets), pair_dice_loss(pl, targets)


class _EagerSegmentGrad(torch.autograd.Function):
    """``_EagerGrad`` for the stacked rows of several layers: the point BCE and dice summed per segment of
    ``sizes`` rows (one segment per layer → ``2 × len(sizes)`` scalars, BCE first). The gradients of all
    segments share one tensor per loss (segments own disjoint rows); the backward scales each segment's
    rows by its loss's incoming gradient. Each segment's values and gradients are those of ``_EagerGrad``
    over that segment's rows alone."""

    @staticmethod
    def forward(ctx, x, sizes, coords, targets):
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            bce, dice = _pair_point_losses(xd, coords, targets)  # [R] each
            g_bce = torch.autograd.grad(bce.sum(), xd, retain_graph=True)[0]
            g_dice = torch.autograd.grad(dice.sum(), xd)[0]
        ctx.save_for_backward(g_bce, g_dice)
        ctx.sizes = sizes
        bce, dice = bce.detach(), dice.detach()
        return tuple(v.sum() for v in bce.split(sizes)) + tuple(v.sum() for v in dice.split(sizes))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        g_bce, g_dice = ctx.saved_tensors
        sizes, n = ctx.sizes, len(ctx.sizes)
        per_row = [torch.cat([go.reshape(1).expand(k) for go, k in zip(gos, sizes)])[:, None, None]
                   for gos in (grad_outs[:n], grad_outs[n:])]  # [R, 1, 1] each
        return per_row[0] * g_bce + per_row[1] * g_dice, None, None, None


def _segment_point_losses(x: torch.Tensor, sizes: list[int], coords: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, ...]:
    if torch.is_grad_enabled() and x.requires_grad:
        return _EagerSegmentGrad.apply(x, sizes, coords, targets)
    bce, dice = _pair_point_losses(x, coords, targets)
    return tuple(v.sum() for v in bce.split(sizes)) + tuple(v.sum() for v in dice.split(sizes))


@dataclasses.dataclass
class _PendingMasks:
    """One layer's mask loss, drawn but not yet computed: ``logits [K, h, w]`` of its matched pairs (image-major),
    the random draws of its points, each pair's image and target index, and where its two losses go."""

    logits: torch.Tensor
    cand: torch.Tensor
    fill: torch.Tensor
    image: torch.Tensor  # [K]
    target: torch.Tensor  # [K]
    num: float
    keys: tuple[str, str]  # "loss_mask" + suffix, "loss_dice" + suffix


class SetCriterion(nn.Module):
    """Weighted losses of MaskDINO's outputs; returns ``{"loss_ce": ..., "loss_ce_0": ..., "loss_ce_dn": ...}``.

    Keys: ``loss_{ce,mask,dice,bbox,giou}`` for the last layer, ``_{i}`` suffixes for auxiliary layers
    (initial prediction first), ``_interm`` for the encoder's selected queries and ``_dn``/``_dn_{i}``
    for denoising queries. All losses are already multiplied by their weights.

    ``batched_masks``: the mask losses of all layers are computed together after every layer's matching
    (the layers' matched pairs stacked: one uncertainty sampling, one target sampling per image, one loss
    evaluation), with each layer's random points drawn in the per-layer order, so the losses and gradients
    equal those of ``loss_masks`` layer by layer (the default). Off by default: on CPU the stacked pass
    measured 1.07-1.30× the per-layer time (``benchmarks/criterion.py``: the stacking copies cost more
    than the saved calls, which are few and large); it is there for launch-bound devices, not yet measured.
    """

    mask_batch_candidates = 1 << 24  # at most this many candidate points per stacked chunk (memory bound)

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, dn: str = "seg",
                 deep_supervision: bool = True, box_loss: bool = True, batched_masks: bool = False,
                 interm_weight: float = 1.0, interm_box_loss: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.dn = dn
        self.deep_supervision = deep_supervision
        self.box_loss = box_loss
        self.batched_masks = batched_masks
        if batched_masks and interm_weight != 1.0:
            raise ValueError("interm_weight != 1 with batched_masks: the deferred _interm mask losses would not be scaled")
        self.interm_weight = interm_weight  # multiplies the ``_interm`` losses (GroundingDINO's INTERM_LOSS_COEF)
        self.interm_box_loss = interm_box_loss  # False: no box losses on the ``_interm`` outputs

    # ---- individual losses, each normalised by ``num`` ----
    def loss_labels(self, out: dict, targets: list[dict], indices: Indices, num: float) -> dict[str, torch.Tensor]:
        """Focal loss against one-hot labels or class vectors (see ``layers.set_prediction``), over the
        columns ``out["logit_mask"]`` keeps when present."""
        logits = out["pred_logits"]  # [B, Q, C]
        b, q = self._src(indices, logits.device)
        target = class_target_tensor(logits, targets, b, q, [j for _, j in indices])
        (loss,) = _eager(focal_loss_sum, logits, target, self.focal_alpha, self.focal_gamma, out.get("logit_mask"))
        return {"loss_ce": loss / num}

    def loss_boxes(self, out: dict, targets: list[dict], indices: Indices, num: float) -> dict[str, torch.Tensor]:
        b, q = self._src(indices, out["pred_boxes"].device)
        src = out["pred_boxes"][b, q]  # [K, 4]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src.dtype)
        l1 = F.l1_loss(src, tgt, reduction="sum")
        giou = (1 - pairwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))).sum()
        return {"loss_bbox": l1 / num, "loss_giou": giou / num}

    def loss_masks(self, out: dict, targets: list[dict], indices: Indices, num: float) -> dict[str, torch.Tensor]:
        """Mask BCE and dice at uncertainty-sampled points of one layer; mask logits only for matched queries.
        ``forward`` computes all layers' together (``batched_masks``); this is the one-layer form, same numbers."""
        m = self._matched_mask_logits(out, indices)
        if m is None:
            return self._zero_mask_losses(out)
        with torch.no_grad():
            coords = uncertain_point_coords(m[:, None].detach().float(), self.num_points,
                                            self.oversample_ratio, self.importance_sample_ratio)  # [K, P, 2]
            tgt_points, start = [], 0
            for t, (_, ti) in zip(targets, indices):
                c = int(ti.numel())
                if c:
                    tgt_points.append(sample_binary_masks(t["masks"], ti.to(m.device), coords[start:start + c]))
                start += c
        bce, dice = _eager(_mask_point_losses, m, coords, torch.cat(tgt_points).float())
        return {"loss_mask": bce / num, "loss_dice": dice / num}

    def _matched_mask_logits(self, out: dict, indices: Indices) -> torch.Tensor | None:
        """Mask logits ``[K, h, w]`` of the matched queries, image-major (None without pairs).

        The logits of every image's matched queries come from one batched product (rows padded to the
        image with most pairs), so the backward adds into ``mask_features`` once per layer rather than
        materialising a full-size zero gradient for each image's slice."""
        embeds, feats = out["pred_embeds"], out["mask_features"]
        device = embeds.device
        counts = [int(qi.numel()) for qi, _ in indices]
        if sum(counts) == 0:
            return None
        b, q = self._src(indices, device)
        slot = torch.cat([torch.arange(c, device=device) for c in counts])  # position among its image's pairs
        bsz, _, h, w = feats.shape
        rows = embeds.new_zeros(bsz, max(counts), embeds.shape[-1]).index_put((b, slot), embeds[b, q])
        return torch.bmm(rows, feats.flatten(2)).view(bsz, -1, h, w)[b, slot]  # [K, h, w]

    @staticmethod
    def _zero_mask_losses(out: dict) -> dict[str, torch.Tensor]:
        zero = out["pred_embeds"].sum() * 0.0 + out["mask_features"].sum() * 0.0
        return {"loss_mask": zero, "loss_dice": zero.clone()}

    def _defer_masks(self, out: dict, indices: Indices, num: float, suffix: str,
                     pending: list[_PendingMasks]) -> dict[str, torch.Tensor | None]:
        """Make one layer's matched mask logits and draw its random points now (the per-layer order of the
        random draws), leaving the sampling and losses to ``_batched_mask_losses``; placeholders keep the
        keys' order."""
        m = self._matched_mask_logits(out, indices)
        if m is None:
            return self._zero_mask_losses(out)
        cand, fill = draw_uncertain_candidates(m.shape[0], self.num_points, self.oversample_ratio,
                                               self.importance_sample_ratio, m.device)
        image, _ = self._src(indices, m.device)
        target = torch.cat([ti for _, ti in indices]).to(m.device)
        pending.append(_PendingMasks(m, cand, fill, image, target, num, ("loss_mask" + suffix, "loss_dice" + suffix)))
        return {"loss_mask": None, "loss_dice": None}

    def _batched_mask_losses(self, pending: list[_PendingMasks], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Weighted mask BCE and dice of every deferred layer: the layers' pairs stacked, in chunks of at most
        ``mask_batch_candidates`` candidate points (a bound on the extra memory), each chunk with one
        uncertainty sampling, one target sampling per image and one loss evaluation."""
        losses: dict[str, torch.Tensor] = {}
        chunk: list[_PendingMasks] = []
        for i, p in enumerate(pending):
            chunk.append(p)
            rows = sum(c.cand.shape[0] for c in chunk)
            nxt = pending[i + 1].cand.shape[0] if i + 1 < len(pending) else 0
            if i + 1 == len(pending) or (rows + nxt) * p.cand.shape[1] > self.mask_batch_candidates:
                losses.update(self._mask_chunk(chunk, targets))
                chunk = []
        return losses

    def _mask_chunk(self, chunk: list[_PendingMasks], targets: list[dict]) -> dict[str, torch.Tensor]:
        m = torch.cat([p.logits for p in chunk]) if len(chunk) > 1 else chunk[0].logits  # [R, h, w]
        sizes = [p.logits.shape[0] for p in chunk]
        n_imp = int(self.importance_sample_ratio * self.num_points)
        with torch.no_grad():
            coords = pick_uncertain_points(m[:, None].detach().float(), torch.cat([p.cand for p in chunk]),
                                           torch.cat([p.fill for p in chunk]), n_imp)  # [R, P, 2]
            image = torch.cat([p.image for p in chunk])
            target = torch.cat([p.target for p in chunk])
            tgt_points = coords.new_zeros(coords.shape[:2])  # [R, P]
            for i, t in enumerate(targets):
                rows = (image == i).nonzero()[:, 0]
                if rows.numel():
                    tgt_points[rows] = sample_binary_masks(t["masks"], target[rows], coords[rows]).float()
        values = _segment_point_losses(m, sizes, coords, tgt_points)
        out = {}
        for p, bce, dice in zip(chunk, values[:len(chunk)], values[len(chunk):]):
            out[p.keys[0]] = bce / p.num * self.weight_dict.get("loss_mask", 1.0)
            out[p.keys[1]] = dice / p.num * self.weight_dict.get("loss_dice", 1.0)
        return out

    @staticmethod
    def _src(indices: Indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        q = torch.cat([q for q, _ in indices]).to(device)
        return b, q

    def _layer(self, out: dict, targets: list[dict], indices: Indices, num: float, masks: bool,
               suffix: str, pending: list[_PendingMasks] | None = None) -> dict[str, torch.Tensor | None]:
        """Weighted losses of one layer; with ``pending``, its mask losses are deferred (None placeholders)."""
        losses = self.loss_labels(out, targets, indices, num)
        if self.box_loss:
            losses.update(self.loss_boxes(out, targets, indices, num))
        if masks and "pred_embeds" in out:
            losses.update(self.loss_masks(out, targets, indices, num) if pending is None
                          else self._defer_masks(out, indices, num, suffix, pending))
        return {k + suffix: None if v is None else v * self.weight_dict.get(k, 1.0) for k, v in losses.items()}

    @staticmethod
    def dn_indices(targets: list[dict], num_groups: int, group_size: int) -> Indices:
        """Denoising query ``g * group_size + j`` reconstructs ground truth ``j`` of its image."""
        out = []
        for t in targets:
            n = int(t["labels"].numel())
            j = torch.arange(n, dtype=torch.int64)
            q = (torch.arange(num_groups, dtype=torch.int64)[:, None] * group_size + j[None]).reshape(-1)
            out.append((q, j.repeat(num_groups)))
        return out

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """``outputs`` of the decoder (see ``MaskDINODecoder.forward``); ``targets`` per image
        ``labels [N]``, ``boxes [N, 4]`` (cxcywh normalised to the image), ``masks [N, H, W]`` (padded)."""
        device = outputs["pred_logits"].device
        # float masks once per step: every layer's matching and mask loss samples them (see sample_binary_masks)
        targets = [dict(t, masks=t["masks"].float()) if "masks" in t and not t["masks"].dtype.is_floating_point
                   else t for t in targets]
        num = num_boxes(targets, device)
        layers = list(outputs.get("aux_outputs", [])) if self.deep_supervision else []
        losses: dict[str, torch.Tensor | None] = {}
        pending: list[_PendingMasks] | None = [] if self.batched_masks else None
        main = {k: v for k, v in outputs.items() if k.startswith("pred_") or k in ("mask_features", "logit_mask")}
        losses.update(self._layer(main, targets, self.matcher(main, targets), num, True, "", pending))
        for i, aux in enumerate(layers):
            losses.update(self._layer(aux, targets, self.matcher(aux, targets), num, True, f"_{i}", pending))
        if "interm_outputs" in outputs:
            interm = outputs["interm_outputs"]
            interm_losses = self._layer(interm, targets, self.matcher(interm, targets), num, True, "_interm", pending)
            if not self.interm_box_loss:
                interm_losses = {k: v for k, v in interm_losses.items() if not k.startswith(("loss_bbox", "loss_giou"))}
            if self.interm_weight != 1.0:
                interm_losses = {k: v * self.interm_weight for k, v in interm_losses.items()}
            losses.update(interm_losses)
        dn_outputs = outputs.get("dn_outputs")
        if dn_outputs:
            meta = outputs["dn_meta"]
            idx = self.dn_indices(targets, meta["num_groups"], meta["group_size"])
            dn_num = num * meta["num_groups"]
            with_masks = self.dn == "seg"
            *dn_aux, dn_last = dn_outputs
            losses.update(self._layer(dn_last, targets, idx, dn_num, with_masks, "_dn", pending))
            if self.deep_supervision:
                for i, aux in enumerate(dn_aux):
                    losses.update(self._layer(aux, targets, idx, dn_num, with_masks, f"_dn_{i}", pending))
        if pending:
            losses.update(self._batched_mask_losses(pending, targets))
        losses.update(self.extra_losses(outputs, targets, num))
        return losses

    def extra_losses(self, outputs: dict, targets: list[dict], num: float) -> dict[str, torch.Tensor]:
        """Losses a subclass adds (DI-MaskDINO: token interaction), with the step's normaliser ``num``."""
        return {}
