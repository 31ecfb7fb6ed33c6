"""The DINO decoder, written once: two-stage query selection from encoder tokens and iterative box
refinement ("look forward twice") over decoder layers, with explicit per-layer inputs instead of side
channels. Denoising queries enter ``refine`` as extra leading queries with their attention mask.

``BoxRefinementDecoder`` is a template. A subclass owns ``layers`` (e.g. ``DeformableDecoderLayer``),
``ref_point_head`` (MLP 2D → D on the sine embedding of the boxes), ``decoder_norm``, ``bbox_embed``,
``hidden_dim`` and ``initial_pred``, and implements ``predict``; for two-stage query selection
(``top_tokens``) also ``enc_output`` and ``enc_output_norm``. Extension points, all explicit:

* ``token_scores(out_mem, inputs)`` → per encoder token the score that ranks it for selection (closed set:
  best class logit; GroundingDINO: best token similarity with the text);

* ``layer_inputs(i, inputs, hs, selection)`` → the ``DecoderInputs`` layer ``i`` and its heads use (DI-MaskDINO's
  BATO returns updated memory and mask features from layer 1 on; the default returns ``inputs``);
* ``run_layer(i, layer, hs, query_pos, ref_input, inputs, attn_mask)`` → the layer call (GroundingDINO
  passes its text memory, a subclass field of ``DecoderInputs``);
* ``box_delta(i, hs)`` → unsigmoided box update (per-layer box heads override it);
* ``layer_output(hs)`` → what ``predict`` gets from a layer (default ``hs``; MaskDINO's code passes the normed
  queries, which its heads norm again);
* ``reference_delta(i, hs, delta)`` → the update of the next layer's reference boxes (default ``delta``; DINO's,
  MaskDINO's and GroundingDINO's code apply the box head to the un-normed queries there,
  ``MaskDINODecoder(official=True)``, GroundingDINO);
* ``enc_box_head(tgt)`` → the box head of selected encoder tokens (default ``bbox_embed``).

Two-stage selection: ``select_invalid`` (default False) lets tokens whose proposal lies outside the image
compete (scored on zeroed memory, boxes +inf before the sigmoid), as DINO's and GroundingDINO's code do
(the parity of their checkpoints needs it); ``proposals_by_position`` sizes each level's proposals by its position in the memory (DINO's code) instead of by its resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgdino.modeling.layers.geometry import encoder_proposals
from surgdino.modeling.layers.misc import gather_tokens, inverse_sigmoid
from surgdino.modeling.layers.position_encoding import gen_sineembed_for_position


@dataclass
class DecoderInputs:
    """What decoder layers read: ``memory [B, S, D]`` with ``memory_mask [B, S]`` (True = padding), level
    ``shapes`` and ``ratios [B, L, 2]``; ``mask_features [B, Dm, h, w]`` and ``feat_sizes [B, 2]`` (unpadded
    h, w in mask-feature pixels) for mask heads. Subclass it for more (text memory and its mask)."""

    memory: torch.Tensor
    memory_mask: torch.Tensor
    shapes: list[tuple[int, int]]
    ratios: torch.Tensor
    mask_features: torch.Tensor | None = None
    feat_sizes: torch.Tensor | None = None


@dataclass
class QuerySelection:
    """A query selection: ``content [B, Q, D]``, reference boxes ``boxes_unsig [B, Q, 4]`` (unsigmoided),
    ``interm`` (outputs supervised as the encoder's) and ``extras`` (more outputs, e.g. ``ti_outputs``)."""

    content: torch.Tensor
    boxes_unsig: torch.Tensor
    interm: dict
    extras: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


class BoxRefinementDecoder(nn.Module):
    """``refine(tgt, ref_unsig, inputs, attn_mask, selection)`` → one prediction dict per layer (the
    initial prediction first when ``initial_pred``). See the module docstring for what subclasses provide."""

    layers: nn.ModuleList
    ref_point_head: nn.Module
    decoder_norm: nn.Module
    bbox_embed: nn.Module
    hidden_dim: int
    initial_pred: bool

    enc_output: nn.Module
    enc_output_norm: nn.Module
    class_embed: nn.Module
    select_invalid: bool = False
    proposals_by_position: bool = False

    def predict(self, hs: torch.Tensor, boxes: torch.Tensor, inputs: DecoderInputs) -> dict:
        raise NotImplementedError

    # ---- two-stage query selection ----
    def proposals(self, memory: torch.Tensor, memory_mask: torch.Tensor, shapes: list[tuple[int, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token a box prior (its cell, size by resolution) and the transformed memory; invalid → masked.
        Returns ``out_mem [B, S, D]``, unsigmoided priors ``[B, S, 4]`` and validity ``[B, S]``."""
        props = encoder_proposals(memory_mask, shapes, by_position=self.proposals_by_position)  # [B, S, 4] float32
        valid = ((props > 0.01) & (props < 0.99)).all(-1) & ~memory_mask
        props = inverse_sigmoid(props).masked_fill(~valid[..., None], float("inf") if self.select_invalid else 0.0)
        out = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        return out, props, valid

    def token_scores(self, out_mem: torch.Tensor, inputs: DecoderInputs) -> torch.Tensor:
        """``[B, S]``: the best class logit of every transformed encoder token."""
        return self.class_embed(out_mem).max(-1).values

    def top_tokens(self, inputs: DecoderInputs, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` best-scoring valid encoder tokens, best first: content ``[B, K, D]`` (in the graph), boxes
        ``[B, K, 4]`` unsigmoided (encoder box head + proposal) and their validity ``[B, K]``."""
        out_mem, props, valid = self.proposals(inputs.memory, inputs.memory_mask, inputs.shapes)
        with torch.no_grad():  # scores only rank the tokens; the selected ones' outputs are recomputed below
            scores = self.token_scores(out_mem, inputs)  # [B, S]
            if not self.select_invalid:
                scores = scores.masked_fill(~valid, float("-inf"))
        idx = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [B, K]
        tgt = gather_tokens(out_mem, idx)  # [B, K, D]
        # box head on the selected tokens only (same values as on all S tokens, then gathered)
        return tgt, self.enc_box_head(tgt) + gather_tokens(props, idx), torch.gather(valid, 1, idx)

    def enc_box_head(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.bbox_embed(tgt)

    # ---- the refinement loop ----

    def layer_inputs(self, i: int, inputs: DecoderInputs, hs: torch.Tensor,
                     selection: QuerySelection | None) -> DecoderInputs:
        return inputs

    def run_layer(self, i: int, layer: nn.Module, hs: torch.Tensor, query_pos: torch.Tensor, ref_input: torch.Tensor,
                  inputs: DecoderInputs, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return layer(hs, query_pos, ref_input, inputs.memory, inputs.memory_mask, inputs.shapes, attn_mask)

    def box_delta(self, i: int, hs: torch.Tensor) -> torch.Tensor:
        return self.bbox_embed(self.decoder_norm(hs))

    def reference_delta(self, i: int, hs: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def layer_output(self, hs: torch.Tensor) -> torch.Tensor:
        return hs

    def refine(self, tgt: torch.Tensor, ref_unsig: torch.Tensor, inputs: DecoderInputs,
               attn_mask: torch.Tensor | None = None, selection: QuerySelection | None = None) -> list[dict]:
        """``tgt [B, N, D]`` queries with boxes ``ref_unsig [B, N, 4]``; ``attn_mask [N, N]`` True = blocked."""
        ref_sig = ref_unsig.sigmoid()
        preds = []
        if self.initial_pred:
            preds.append(self.predict(tgt, ref_sig, inputs))
        hs, prev = tgt, ref_sig
        for i, layer in enumerate(self.layers):
            inputs = self.layer_inputs(i, inputs, hs, selection)
            ref_in = ref_sig.detach()[:, :, None] * torch.cat([inputs.ratios, inputs.ratios], -1)[:, None]  # [B, N, L, 4]
            query_pos = self.ref_point_head(gen_sineembed_for_position(ref_in[:, :, 0], self.hidden_dim))
            hs = self.run_layer(i, layer, hs, query_pos, ref_in, inputs, attn_mask)
            delta = self.box_delta(i, hs)
            box = (delta + inverse_sigmoid(prev)).sigmoid()  # look forward twice: grads reach the previous layer
            preds.append(self.predict(self.layer_output(hs), box, inputs))
            if i + 1 < len(self.layers):  # the next layer's reference
                local = (self.reference_delta(i, hs, delta) + inverse_sigmoid(ref_sig.detach())).sigmoid()
                prev, ref_sig = local, local.detach()
        return preds
