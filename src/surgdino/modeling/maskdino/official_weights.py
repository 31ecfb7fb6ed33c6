"""IDEA-Research/MaskDINO checkpoints (``model_final.pth``, detectron2 ``.pkl``) ⇄ our names, both ways.

The official layout is the detectron2 model's state dict: ``backbone.*``, ``sem_seg_head.pixel_decoder.*``,
``sem_seg_head.predictor.*`` and the loss buffer ``criterion.empty_weight``. It loads into a model with
``MODEL.MaskDINO.ARCHITECTURE official``, which reproduces the official level orders, so no level-indexed
tensor (``level_embed``, ``sampling_offsets``, ``attention_weights``) is permuted: only names move.

The framework (``KeyMap``), for MaskDINO here and extended for DI-MaskDINO:

* ``Rule(official, ours)``: two name templates, ``{x}`` matching one dotted component and ``{x*}`` the rest of
  the name; a rule renames both ways (``norm1``/``norm2`` of decoder layers are swapped by two rules: the
  official layer normalises with ``norm2`` after self-attention, ours with ``norm1``).
* ``Tie(copy, canonical)``: official names that are the same module saved twice (``bbox_embed.N`` and
  ``decoder.bbox_embed.N`` are ``_bbox_embed``; ``decoder.norm`` is ``decoder_norm``). ``to_ours`` checks that
  every copy equals its canonical tensor (a differing copy is an error, never silently one of them) and drops
  it; ``to_official`` writes the copies back (``{j}`` runs over the decoder layers).
* ``ignored``: official tensors with no meaning here, with the reason (loss buffers recomputed from config).
* ``indexed(state, to_official, **options)``: renames whose index depends on the layout (input projections, FPN
  convolutions), computed from the tensors' shapes (official → ours) or from ``options`` (ours → official:
  ``feature_order``, the official FEATURE_ORDER, default high2low); ``None`` when the map has none.

``KeyMap.extended(rules=..., ties=..., ignored=...)`` returns a new map with more entries tried first, so
DI-MaskDINO's map is ``MASKDINO.extended(rules=[Rule("sem_seg_head.predictor.oldm.{x*}", "decoder.ti.{x*}")])``
and registers itself with ``register_official_map``. ``to_ours(state) → (ours, OfficialReport)``: the report
lists every official tensor used by no rule (with its shape) and the ties checked; ``report.unfilled(model)``
lists every model tensor the converted weights leave unfilled (with shapes). ``convert_official`` then hands the
``backbone.*`` tensors to the backbones' registered converters (official Swin / ConvNeXt names → ours).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from surgdino.checkpoint_io import as_tensor, convert_weights, register_weight_converter, unwrap_state_dict
from surgdino.errors import CheckpointError
from surgdino.log import get_logger

logger = get_logger(__name__)

OFFICIAL_PREFIXES = ("sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.")
PD, PR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."


@functools.cache
def _compile(template: str) -> tuple[re.Pattern, str]:
    """``a.{i}.b.{p*}`` → a full-match regex with named groups and the ``str.format`` template."""
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)(\*?)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^.]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z"), re.sub(r"\{(\w+)\*\}", r"{\1}", template)


@dataclass(frozen=True)
class Rule:
    """``official`` ⇄ ``ours`` name templates (``{x}`` one component, ``{x*}`` the rest)."""

    official: str
    ours: str

    def apply(self, name: str, to_official: bool) -> str | None:
        src, dst = (self.ours, self.official) if to_official else (self.official, self.ours)
        m = _compile(src)[0].match(name)
        return _compile(dst)[1].format(**m.groupdict()) if m else None


@dataclass(frozen=True)
class Tie:
    """Official ``copy`` (may use ``{j}``, a decoder layer) saved from the same module as ``canonical``."""

    copy: str
    canonical: str


@dataclass
class OfficialReport:
    """What a conversion used: ``unused`` official tensors (name, shape), ``ignored`` (name, reason), ties checked."""

    source: str
    unused: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    ties: int = 0
    converted: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def unfilled(self, model_state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
        """Model tensors the converted weights do not fill (absent or of another shape), with model shapes."""
        return [(k, tuple(v.shape)) for k, v in model_state.items()
                if k not in self.converted or tuple(self.converted[k].shape) != tuple(v.shape)]

    def lines(self, model_state: Mapping[str, torch.Tensor] | None = None) -> list[str]:
        out = [f"{self.source}: official MaskDINO layout, {len(self.converted)} tensors mapped, {self.ties} tied "
               f"copies checked and merged, {len(self.ignored)} ignored, {len(self.unused)} unused"]
        out += [f"  ignored {n}: {why}" for n, why in self.ignored]
        out += [f"  unused (no place in the model) {n} {list(s)}" for n, s in self.unused]
        if model_state is not None:
            unfilled = self.unfilled(model_state)
            out.append(f"  {len(unfilled)} model tensors not filled")
            for k, s in unfilled:
                got = self.converted.get(k)
                why = f" (checkpoint {list(got.shape)})" if got is not None else ""
                out.append(f"  not filled {k} {list(s)}{why}")
        return out


IndexedRenames = Callable[..., "dict[str, str]"]  # (state, to_official, **options) → {name: new name}


@dataclass(frozen=True)
class KeyMap:
    """Name rules, ties and ignored tensors of one official architecture; see the module docstring."""

    rules: tuple[Rule, ...]
    ties: tuple[Tie, ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()  # (official name regex, reason)
    indexed: IndexedRenames | None = None

    def extended(self, *, rules: list[Rule] = (), ties: list[Tie] = (), ignored: list[tuple[str, str]] = (),
                 indexed: IndexedRenames | None = None) -> KeyMap:
        """A map with ``rules``/``ties``/``ignored`` tried before this one's; ``indexed`` adds renames."""
        base = self.indexed
        if indexed is not None and base is not None:
            def both(state: Mapping[str, Any], to_official: bool, **options: Any) -> dict[str, str]:
                return {**base(state, to_official, **options), **indexed(state, to_official, **options)}
            merged: IndexedRenames | None = both
        else:
            merged = indexed or base
        return KeyMap(tuple(rules) + self.rules, tuple(ties) + self.ties, tuple(ignored) + self.ignored, merged)

    def rename(self, name: str, to_official: bool, fixed: Mapping[str, str]) -> str | None:
        if name in fixed:
            return fixed[name]
        for rule in self.rules:
            new = rule.apply(name, to_official)
            if new is not None:
                return new
        return None

    def to_ours(self, state: Mapping[str, Any], source: str = "state dict") -> tuple[dict[str, torch.Tensor], OfficialReport]:
        """Official names → ours; ``CheckpointError`` when a tied copy differs from its canonical tensor."""
        tensors = {k: t for k, t in ((k, as_tensor(v)) for k, v in state.items()) if t is not None}
        report = OfficialReport(source)
        canonical_of: dict[str, str] = {}
        for tie in self.ties:
            pat = _compile(tie.copy)[0]
            for k in tensors:
                m = pat.match(k)
                if m:
                    rest = {g: v for g, v in m.groupdict().items() if g != "j"}
                    canonical_of[k] = _compile(tie.canonical)[1].format(**rest)
        for copy, canon in canonical_of.items():
            if canon not in tensors:  # only the copy was saved: it is the tensor
                tensors[canon] = tensors[copy]
            elif not torch.equal(tensors[copy], tensors[canon]):
                raise CheckpointError(f"{source}: {copy} should be a tied copy of {canon} but differs from it; the file "
                                      "was edited or is not an official MaskDINO checkpoint")
            report.ties += 1
        fixed = self.indexed(tensors, False) if self.indexed else {}
        for k, t in tensors.items():
            if k in canonical_of:
                continue
            why = next((reason for pat, reason in self.ignored if re.fullmatch(pat, k)), None)
            if why is not None:
                report.ignored.append((k, why))
                continue
            new = self.rename(k, False, fixed)
            if new is None:
                report.unused.append((k, tuple(t.shape)))
            else:
                report.converted[new] = t
        return dict(report.converted), report

    def to_official(self, state: Mapping[str, torch.Tensor], **options: Any) -> dict[str, torch.Tensor]:
        """Our names → the official ones, tied copies written back (one per decoder layer); ``options`` go to
        ``indexed`` (MaskDINO: ``feature_order``, the model's official FEATURE_ORDER, default high2low)."""
        fixed = self.indexed(state, True, **options) if self.indexed else {}
        out: dict[str, torch.Tensor] = {}
        unmapped = []
        for k, t in state.items():
            new = self.rename(k, True, fixed)
            if new is None:
                unmapped.append(k)
            else:
                out[new] = t
        if unmapped:
            raise CheckpointError(f"{len(unmapped)} tensors have no place in the official layout, e.g. {unmapped[:3]}; "
                                  "only MODEL.MaskDINO.ARCHITECTURE official models convert back")
        layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder\.layers\.(\d+)\.", k))})
        for tie in self.ties:
            pat = _compile(tie.canonical)[0]
            for k in list(out):
                m = pat.match(k)
                if not m:
                    continue
                for j in (layers if "{j}" in tie.copy else [None]):
                    out[_compile(tie.copy)[1].format(**m.groupdict(), j=j)] = out[k]
        return out


def _maskdino_indexed(state: Mapping[str, Any], to_official: bool, feature_order: str = "high2low") -> dict[str, str]:
    """Input projections and FPN convolutions, whose indices depend on the level count and order.

    Official ``input_proj.i`` (``i < n``: 1×1 projections of the encoder's backbone levels, coarse first when
    their input channels fall — FEATURE_ORDER high2low — else fine first; ``i >= n``: the extra stride-2
    levels) ⇄ our ``input_proj.k`` (fine first) and ``extra_proj.e``; official ``adapter_k``/``layer_k``
    (k = 1 the finest) ⇄ our ``lateral``/``output`` (coarse first)."""
    out: dict[str, str] = {}
    if to_official:
        n = len({m.group(1) for k in state if (m := re.match(r"pixel_decoder\.input_proj\.(\d+)\.", k))})
        coarse_first = feature_order == "high2low"  # the official encoder then sees (and projects) coarse first
        nl = len({m.group(1) for k in state if (m := re.match(r"pixel_decoder\.lateral\.(\d+)\.", k))})
        for k in state:
            m = re.match(r"pixel_decoder\.(input_proj|extra_proj|lateral|output)\.(\d+)\.(conv|norm)\.(.+)$", k)
            if not m:
                continue
            kind, idx, part, param = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            sub = "0" if part == "conv" else "1"
            if kind == "input_proj":
                i = (n - 1 - idx) if coarse_first else idx
                out[k] = f"{PD}input_proj.{i}.{sub}.{param}"
            elif kind == "extra_proj":
                out[k] = f"{PD}input_proj.{n + idx}.{sub}.{param}"
            else:
                name = "adapter" if kind == "lateral" else "layer"
                out[k] = f"{PD}{name}_{nl - idx}." + (param if part == "conv" else f"norm.{param}")
        return out
    projs = {}
    for k, t in state.items():
        m = re.match(re.escape(PD) + r"input_proj\.(\d+)\.0\.weight$", k)
        if m:
            projs[int(m.group(1))] = tuple(t.shape)
    levels = [i for i in sorted(projs) if projs[i][-1] == 1]  # 1x1: backbone levels
    extras = [i for i in sorted(projs) if projs[i][-1] != 1]
    chans = [projs[i][1] for i in levels]
    coarse_first = len(chans) > 1 and chans[0] > chans[-1]
    n = len(levels)
    adapters = sorted(int(m.group(1)) for k in state if (m := re.match(re.escape(PD) + r"adapter_(\d+)\.weight$", k)))
    for k in state:
        m = re.match(re.escape(PD) + r"input_proj\.(\d+)\.([01])\.(.+)$", k)
        if m:
            i, part = int(m.group(1)), "conv" if m.group(2) == "0" else "norm"
            if i in extras:
                out[k] = f"pixel_decoder.extra_proj.{extras.index(i)}.{part}.{m.group(3)}"
            elif i in levels:
                out[k] = f"pixel_decoder.input_proj.{n - 1 - i if coarse_first else i}.{part}.{m.group(3)}"
            continue
        m = re.match(re.escape(PD) + r"(adapter|layer)_(\d+)\.(norm\.)?(.+)$", k)
        if m:
            kind = "lateral" if m.group(1) == "adapter" else "output"
            part = "norm" if m.group(3) else "conv"
            out[k] = f"pixel_decoder.{kind}.{len(adapters) - int(m.group(2))}.{part}.{m.group(4)}"
    return out


MASKDINO = KeyMap(
    rules=(
        Rule("backbone.{x*}", "backbone.{x*}"),
        Rule(PD + "transformer.level_embed", "pixel_decoder.level_embed"),
        Rule(PD + "transformer.encoder.layers.{i}.{x*}", "pixel_decoder.layers.{i}.{x*}"),
        Rule(PD + "mask_features.{p}", "pixel_decoder.mask_features.{p}"),
        Rule(PR + "decoder.layers.{i}.norm2.{p}", "decoder.layers.{i}.norm1.{p}"),  # after self-attention
        Rule(PR + "decoder.layers.{i}.norm1.{p}", "decoder.layers.{i}.norm2.{p}"),  # after cross-attention
        Rule(PR + "decoder.layers.{i}.{x*}", "decoder.layers.{i}.{x*}"),
        Rule(PR + "decoder.ref_point_head.{x*}", "decoder.ref_point_head.{x*}"),
        Rule(PR + "_bbox_embed.{x*}", "decoder.bbox_embed.{x*}"),
        Rule(PR + "enc_output.{x*}", "decoder.enc_output.{x*}"),
        Rule(PR + "enc_output_norm.{x*}", "decoder.enc_output_norm.{x*}"),
        Rule(PR + "class_embed.{x*}", "decoder.class_embed.{x*}"),
        Rule(PR + "label_enc.{x*}", "decoder.label_enc.{x*}"),
        Rule(PR + "mask_embed.{x*}", "decoder.mask_embed.{x*}"),
        Rule(PR + "decoder_norm.{x*}", "decoder.decoder_norm.{x*}"),
    ),
    ties=(
        Tie(PR + "bbox_embed.{j}.{x*}", PR + "_bbox_embed.{x*}"),
        Tie(PR + "decoder.bbox_embed.{j}.{x*}", PR + "_bbox_embed.{x*}"),
        Tie(PR + "decoder.norm.{p}", PR + "decoder_norm.{p}"),
    ),
    ignored=(
        (r"criterion\.empty_weight", "a loss buffer (no-object weight), rebuilt from the config"),
        (r".*num_batches_tracked", "a BatchNorm step counter, not a weight"),
        (r"pixel_(mean|std)", "normalisation constants, taken from MODEL.PIXEL_MEAN / PIXEL_STD"),
    ),
    indexed=_maskdino_indexed,
)

_OFFICIAL_MAPS: list[tuple[Callable[[Mapping[str, Any]], bool], KeyMap]] = []


def register_official_map(detect: Callable[[Mapping[str, Any]], bool], keymap: KeyMap) -> None:
    """Add ``keymap`` for official states ``detect`` recognises; later registrations are tried first
    (DI-MaskDINO before MaskDINO)."""
    _OFFICIAL_MAPS.insert(0, (detect, keymap))


def is_official_maskdino(state: Mapping[str, Any]) -> bool:
    return any(isinstance(k, str) and k.startswith(OFFICIAL_PREFIXES) for k in state)


register_official_map(is_official_maskdino, MASKDINO)


def official_keymap(state: Mapping[str, Any]) -> KeyMap | None:
    """The registered map for an (unwrapped) official state, or None."""
    return next((km for detect, km in _OFFICIAL_MAPS if detect(state)), None)


def _backbone_layout(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone.*`` through the backbones' registered converters (official Swin / ConvNeXt names → ours);
    detectron2 ResNet names are ours already (no converter claims them)."""
    backbone = {k: v for k, v in out.items() if k.startswith("backbone.")}
    converted = convert_weights(backbone) if backbone else None
    if converted is None:
        return out
    return {**{k: v for k, v in out.items() if not k.startswith("backbone.")}, **converted}


def convert_official(obj: Mapping[str, Any], source: str = "state dict") -> tuple[dict[str, torch.Tensor], OfficialReport]:
    """An official MaskDINO / DI-MaskDINO checkpoint (any wrapper) → our names and the report."""
    state = unwrap_state_dict(obj)
    km = official_keymap(state)
    if km is None:
        raise CheckpointError(f"{source}: not an official MaskDINO checkpoint (no 'sem_seg_head.pixel_decoder.*' or "
                              "'sem_seg_head.predictor.*' tensors)")
    out, report = km.to_ours(state, source)
    report.converted = _backbone_layout(out)
    return dict(report.converted), report


@register_weight_converter
def official_maskdino_as_model_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """``MODEL.WEIGHTS`` in the official layout: converted, with every unused official tensor logged (shapes);
    the model must be built with ``MODEL.MaskDINO.ARCHITECTURE official`` for the official computation."""
    if not is_official_maskdino(state):
        return None
    out, report = convert_official(state, "MODEL.WEIGHTS")
    for line in report.lines():
        (logger.warning if line.lstrip().startswith("unused") else logger.info)(line)
    if "pixel_decoder.input_proj.0.conv.bias" not in out:
        logger.warning("MODEL.WEIGHTS: official checkpoint without input-projection biases; is it MaskDINO's?")
    logger.info("MODEL.WEIGHTS: official weights compute as the official model only with MODEL.MaskDINO.ARCHITECTURE "
                "official (the surgdino architecture ignores the input-projection biases and orders levels otherwise)")
    return out
