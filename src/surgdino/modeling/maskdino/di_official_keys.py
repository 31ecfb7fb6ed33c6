"""Official DI-MaskDINO decoder names (``sem_seg_head.predictor.*``) ↔ ours (``decoder.*``), design ``official``.

The official decoder registers several modules under more than one name (tied copies): ``class_embed`` also
as ``decoder.class_embed`` and ``oldm.class_embed``; the box head as ``_bbox_embed``, ``bbox_embed.N`` and
``decoder.bbox_embed.N``; the TI box head as ``_oldm_bbox_embed``, ``oldm_bbox_embed.N`` and
``oldm.bbox_embed.N``; ``oldm_norm`` as ``oldm.norm``; ``decoder_norm`` as ``decoder.norm``; BATO's update as
``query_guide_feature_update`` and ``decoder.query_guide_feature_update``. Loading reads the first name and
checks that the copies are equal; writing fills every copy.

The official decoder layer calls its norms against their numbers: ``norm2`` follows self-attention and
``norm1`` cross-attention (ours are numbered in execution order), so they are swapped, not renamed.

``maskdino_entries`` covers the MaskDINO part of the predictor (the official MaskDINO decoder has the same
names); ``di_entries`` the De-Imbalance and BATO parts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from surgdino.errors import CheckpointError

Entry = tuple[str, tuple[str, ...]]  # (our module prefix, official prefixes: the first is read, all are written)

OFFICIAL_PREFIX = "sem_seg_head.predictor."
OUR_PREFIX = "decoder."


def _layer_entries(ours: str, official: str, n: int, swap: dict[str, str] | None = None) -> list[Entry]:
    """Per-layer entries; ``swap`` maps our sub-module names to the official ones where they differ."""
    parts = ["self_attn", "cross_attn", "norm1", "norm2", "norm3", "linear1", "linear2"]
    swap = swap or {}
    return [(f"{ours}.{i}.{p}", (f"{official}.{i}.{swap.get(p, p)}",)) for i in range(n) for p in parts]


def maskdino_entries(dec_layers: int) -> list[Entry]:
    """The MaskDINO decoder's parts of the predictor (two-stage selection, heads, refinement layers)."""
    entries: list[Entry] = [
        ("enc_output", ("enc_output",)), ("enc_output_norm", ("enc_output_norm",)), ("label_enc", ("label_enc",)),
        ("class_embed", ("class_embed", "decoder.class_embed", "oldm.class_embed")),
        ("mask_embed", ("mask_embed", "decoder.mask_embed")),
        ("decoder_norm", ("decoder_norm", "decoder.norm")),
        ("bbox_embed", ("_bbox_embed", *(f"bbox_embed.{i}" for i in range(dec_layers)),
                        *(f"decoder.bbox_embed.{i}" for i in range(dec_layers)))),
        ("ref_point_head", ("decoder.ref_point_head",)),
    ]
    return entries + _layer_entries("layers", "decoder.layers", dec_layers, {"norm1": "norm2", "norm2": "norm1"})


def di_entries(ti_layers: int) -> list[Entry]:
    """De-Imbalance (``oldm``) and BATO parts of the official DI-MaskDINO predictor."""
    bato = [(f"bato_update.{p}", (f"query_guide_feature_update.{q}", f"decoder.query_guide_feature_update.{q}"))
            for p, q in [("cross_attn", "multihead_attn"), ("norm1", "norm1"), ("norm2", "norm2"),
                         ("linear1", "linear1"), ("linear2", "linear2")]]
    return [
        ("ti_norm", ("oldm_norm", "oldm.norm")),
        ("ti_ref_point_head", ("oldm.ref_point_head",)),
        ("ti_bbox_embed", ("_oldm_bbox_embed", *(f"oldm_bbox_embed.{i}" for i in range(ti_layers)),
                           *(f"oldm.bbox_embed.{i}" for i in range(ti_layers)))),
        *[(f"ti_layers.{i}.{p}", (f"oldm.layers.{i}.{p}",))
          for i in range(ti_layers) for p in ("self_attn", "norm1", "norm2", "linear1", "linear2")],
        *bato,
        ("bato_mask_conv", ("decoder.mask_output_conv",)),
        ("bato_mask_norm", ("decoder.mask_output_conv.norm",)),
    ]


def predictor_entries(decoder) -> list[Entry]:
    """All entries of an official-design ``DIMaskDINODecoder`` (or a ``MaskDINODecoder``)."""
    entries = maskdino_entries(len(decoder.layers))
    if getattr(decoder, "design", None) == "official":
        entries += di_entries(len(decoder.ti_layers))
    return entries


def _match(key: str, entries: list[Entry]) -> tuple[str, tuple[str, ...], str] | None:
    """The entry whose our-prefix is the longest one ``key`` starts with: (prefix, official prefixes, rest)."""
    best = None
    for ours, official in entries:
        if key.startswith(ours + ".") and (best is None or len(ours) > len(best[0])):
            best = (ours, official, key[len(ours):])
    return best


def to_official(ours: Mapping[str, torch.Tensor], entries: list[Entry]) -> dict[str, torch.Tensor]:
    """Our decoder state (keys relative to the decoder) → official predictor state, every tied copy filled."""
    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        m = _match(key, entries)
        if m is None:
            raise CheckpointError(f"decoder.{key}: no official DI-MaskDINO name (design 'official' has no such "
                                  "tensor); build the decoder with MODEL.MaskDINO.DI_DESIGN official")
        for official in m[1]:
            out[official + m[2]] = value
    return out


def from_official(official: Mapping[str, torch.Tensor], entries: list[Entry], our_keys: list[str],
                  source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Official predictor state (keys relative to the predictor) → our decoder state for ``our_keys``.

    Returns (our state, official names not used, our keys not filled). A tied copy that differs from the
    tensor it copies is a ``CheckpointError`` naming both."""
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key in our_keys:
        m = _match(key, entries)
        names = [o + m[2] for o in m[1]] if m else []
        if not names or names[0] not in official:
            missing.append(key)
            continue
        value = official[names[0]]
        for copy in names[1:]:
            if copy in official:
                if official[copy].shape != value.shape or not torch.equal(official[copy], value):
                    raise CheckpointError(f"{source}: {OFFICIAL_PREFIX}{copy} differs from "
                                          f"{OFFICIAL_PREFIX}{names[0]}, of which it should be a tied copy; the "
                                          "file was edited or is not an official DI-MaskDINO checkpoint")
                used.add(copy)
        used.add(names[0])
        state[key] = value
    unused = sorted(k for k in official if k not in used)
    return state, unused, missing
