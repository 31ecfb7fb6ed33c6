"""Text prompts of the GroundingDINO detector: class names → tokens, positive maps, sub-sentence masks.

Two modes (``MODEL.GDINO.PROMPT_MODE``):

- ``caption`` — the reference's, kept for checkpoint parity. Names are lowercased, inner whitespace
  collapsed, and joined as ``"name one . name two ."`` (IDEA's ``build_captions_and_token_span``);
  one sequence of at most ``max_text_len`` (256) tokens. A class's positive map covers the tokens
  whose character offsets fall in its name (IDEA's ``create_positive_map_from_span``), normalised
  to sum 1; a repeated name maps every class of that name to its last occurrence, as the
  reference's name → span dict does. The text self-attention mask and position ids are those of
  ``generate_masks_with_special_tokens_and_transfer_map`` (IDEA, Open-GroundingDino and
  transformers agree): a token attends to the tokens of its phrase (up to and including the next
  delimiter ``[CLS]``, ``[SEP]``, ``.``, ``?``), position ids restart at 0 in each phrase. Unlike
  the reference, a delimiter inside a class name ("14.5 cm") does not split it: delimiters are
  taken from the name spans, not from the token ids alone. A caption longer than ``max_text_len``
  is cut at a class boundary (the reference cuts mid-name); classes cut off get an empty map and a
  warning that names ``pooled``.
- ``pooled`` — any number of classes in one forward pass (500 trays' names in one call; the
  reference stops at 256 tokens and its maintainers advise several passes). Each name is encoded
  as its own short sequence ``[CLS] name [SEP]``, all names in ONE batched text-encoder call
  (``[C, L]``, L = longest name), and pooled to one vector (mean over tokens for BERT/MiniLM, the
  end-of-text feature for CLIP). The detector then sees C text "tokens", one per class: token mask
  all valid, self-attention mask the identity (each class is its own sub-sentence, as in caption
  mode), position ids 0 and the identity as positive map. Cost grows with C (fusion and the
  contrastive head see C tokens instead of ≤ 256) and there is no limit on C. Chosen over a
  block-diagonal layout of all name tokens (≈ 4 tokens per name: 4× the text tokens for the same
  information) and over chunked captions merged (several passes through the image side).

:class:`TokenizedPrompt` carries what the text encoder and the detector need;
:func:`encode_prompt` runs the text encoder on it. Free text ("mayo scissors . allis forceps") is
split into names by :func:`split_prompt`, which keeps "14.5 cm" whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from surgdino.errors import SurgDinoError
from surgdino.log import get_logger
from surgdino.modeling.grounding.text_encoders import TextEncoder, TextTokenizer

logger = get_logger(__name__)

PROMPT_MODES = ("caption", "pooled")
_SPACED_DOT = re.compile(r"(?:(?<=\s)|^)\.(?=\s|$)|\.$")  # the reference's " . " separator (or a final dot)
_PHRASE_END = re.compile(r"\.(?=\s|$)")  # a dot ending a word: not the one in "14.5"


def normalize_name(name: str) -> str:
    """Lowercased, words joined by one space (the reference's ``force_lowercase`` and word split)."""
    return " ".join(str(name).lower().split())


def split_prompt(text: str) -> list[str]:
    """Free text → class names. With the reference's ``" . "`` separators, split only there (so
    ``"no. 3 scalpel . mayo scissors"`` is two names); otherwise at every dot that ends a word
    (``"mayo scissors. allis forceps."``). A dot inside a word or number never splits (``"14.5 cm"``)."""
    pattern = _SPACED_DOT if re.search(r"\s\.(\s|$)", " " + text) else _PHRASE_END
    return [n for n in (normalize_name(p) for p in pattern.split(text)) if n]


def build_caption(names: Sequence[str]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """``"name one . name two ."``, each class's (start, end) characters (a repeated name → its last
    occurrence, as the reference) and each occurrence's span in order."""
    caption = ""
    occurrences: list[tuple[int, int]] = []
    last: dict[str, tuple[int, int]] = {}
    for i, raw in enumerate(names):
        name = normalize_name(raw)
        if not name:
            raise SurgDinoError(f"class name {i} ({raw!r}) is empty; every category needs a name for the text prompt")
        if caption:
            caption += " "
        span = (len(caption), len(caption) + len(name))
        caption += name + " ."
        occurrences.append(span)
        last[name] = span
    spans = [last[normalize_name(n)] for n in names]
    if len(last) < len(names):
        logger.warning("%d repeated class names in the prompt: classes with the same name share one text span",
                       len(names) - len(last))
    return caption, spans, occurrences


def sub_sentence_mask(delimiters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text self-attention mask ``[B, T, T]`` (True = attend) and position ids ``[B, T]`` from where the
    delimiters are (``[B, T]`` bool), with the reference's semantics.

    A token belongs to the phrase closed by the first delimiter at or after it; phrases closed at
    position 0 or T-1 (``[CLS]``, a final ``[SEP]``) or never closed (padding) are singletons with
    position 0. Tokens of a phrase attend to each other; position = distance from the previous delimiter − 1.
    """
    b, t = delimiters.shape
    idx = torch.arange(t, device=delimiters.device).expand(b, t)  # [B, T]
    prev = torch.where(delimiters, idx, torch.full_like(idx, -1)).cummax(1).values  # last delimiter ≤ j
    prev = torch.cat([prev.new_full((b, 1), -1), prev[:, :-1]], 1)  # last delimiter < j
    nxt = torch.where(delimiters, idx, torch.full_like(idx, t)).flip(1).cummin(1).values.flip(1)  # first ≥ j
    valid = (nxt > 0) & (nxt < t - 1)  # [B, T]
    mask = (nxt[:, :, None] == nxt[:, None, :]) & valid[:, None, :]  # [B, T, T]
    mask = mask | torch.eye(t, dtype=torch.bool, device=delimiters.device)
    position_ids = torch.where(valid, idx - prev - 1, torch.zeros_like(idx)).clamp_min(0)
    return mask, position_ids.long()


def delimiter_mask(input_ids: torch.Tensor, delimiter_ids: Sequence[int],
                   in_names: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` True where a token is a delimiter id and (with ``in_names``) not inside a class name."""
    out = torch.isin(input_ids, torch.as_tensor(list(delimiter_ids), device=input_ids.device))
    return out & ~in_names if in_names is not None else out


@dataclass
class TokenizedPrompt:
    """Tokens of a class prompt and what the detector needs of them (one prompt, shared by the batch).

    ``input_ids``/``attention_mask``/``token_type_ids``/``position_ids``/``encoder_mask`` are the text
    encoder's inputs (``[N, L]``; caption: N = 1, pooled: N = C names). The rest describe the T text
    tokens the detector sees (caption: T = L, pooled: T = C): ``text_mask [T]`` (True = real token),
    ``self_attention_mask [T, T]``, ``text_position_ids [T]``, ``positive_map [C, T]`` (rows sum to 1,
    or 0 for a class cut off), ``offsets`` (caption characters of each token).
    """

    mode: str
    names: list[str]
    caption: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    encoder_mask: torch.Tensor
    text_mask: torch.Tensor
    self_attention_mask: torch.Tensor
    text_position_ids: torch.Tensor
    positive_map: torch.Tensor
    offsets: list[tuple[int, int]]
    num_dropped: int = 0
    _cache: tuple | None = field(default=None, repr=False, compare=False)  # (key, features) of encode_prompt

    @property
    def num_tokens(self) -> int:
        return int(self.positive_map.shape[1])

    def to(self, device: torch.device | str) -> TokenizedPrompt:
        kw = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        return TokenizedPrompt(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()})


def _token_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], t: int) -> torch.Tensor:
    """``[C, T]`` bool: token j is in span c (its characters overlap the span; special tokens never)."""
    out = torch.zeros(len(spans), t, dtype=torch.bool)
    for j, (s, e) in enumerate(offsets[:t]):
        if e <= s:
            continue
        for c, (a, z) in enumerate(spans):
            if s < z and a < e:
                out[c, j] = True
    return out


def _fit_caption(tokenizer: TextTokenizer, caption: str, occurrences: list[tuple[int, int]],
                 limit: int) -> tuple[str, int]:
    """The longest prefix of whole classes whose caption encodes in ≤ ``limit`` tokens, and how many classes it holds."""
    ids, offsets = tokenizer.encode(caption)
    if len(ids) <= limit:
        return caption, len(occurrences)
    k = 0
    for c, (_, end) in enumerate(occurrences):  # tokens up to this class's " ." plus [SEP]
        n = sum(1 for (s, e) in offsets if e > s and e <= end + 2) + 2
        if n > limit:
            break
        k = c + 1
    if k == 0:
        return "", 0
    cut = occurrences[k - 1][1] + 2
    return caption[:cut], k


def tokenize_prompt(tokenizer: TextTokenizer, names: Sequence[str], *, mode: str = "caption",
                    max_text_len: int = 256, sub_sentence: bool = True) -> TokenizedPrompt:
    """Tokenize class ``names`` for the detector in ``mode`` (``caption`` or ``pooled``)."""
    names = [str(n) for n in names]
    if not names:
        raise SurgDinoError("the text prompt has no class names")
    if mode == "pooled":
        return _tokenize_pooled(tokenizer, names)
    if mode != "caption":
        raise SurgDinoError(f"prompt mode {mode!r} is not one of {list(PROMPT_MODES)}")
    caption, spans, occurrences = build_caption(names)
    limit = min(max_text_len, tokenizer.max_length)
    kept_caption, kept = _fit_caption(tokenizer, caption, occurrences, limit)
    if kept < len(names):
        logger.warning("caption of %d class names is longer than %d tokens: %d classes after %r are cut off and cannot be "
                       "detected; set MODEL.GDINO.PROMPT_MODE pooled to fit every class in one pass",
                       len(names), limit, len(names) - kept, normalize_name(names[kept - 1]) if kept else "")
        if kept == 0:
            raise SurgDinoError(f"class name {normalize_name(names[0])!r} alone is longer than {limit} tokens")
    ids, offsets = tokenizer.encode(kept_caption)
    t = len(ids)
    input_ids = torch.tensor([ids], dtype=torch.long)  # [1, T]
    end = len(kept_caption)
    visible = [s if s[1] <= end else (0, 0) for s in spans]  # classes whose (last) span was cut off → empty
    in_span = _token_spans(offsets, visible, t)  # [C, T]
    in_names = _token_spans(offsets, [o for o in occurrences if o[1] <= end], t).any(0)  # [T]
    if sub_sentence:
        mask, pos = sub_sentence_mask(delimiter_mask(input_ids, tokenizer.delimiter_ids, in_names[None]))
    else:
        valid = torch.ones(1, t, dtype=torch.bool)
        mask, pos = valid[:, :, None] & valid[:, None, :], torch.arange(t)[None]
    pmap = in_span.float()
    pmap = pmap / pmap.sum(-1, keepdim=True).clamp_min(1.0)  # [C, T]
    return TokenizedPrompt(
        mode="caption", names=names, caption=kept_caption, input_ids=input_ids,
        attention_mask=torch.ones(1, t, dtype=torch.long), token_type_ids=torch.zeros(1, t, dtype=torch.long),
        position_ids=pos, encoder_mask=mask if sub_sentence else torch.ones(1, t, dtype=torch.long),
        text_mask=torch.ones(t, dtype=torch.bool), self_attention_mask=mask[0], text_position_ids=pos[0],
        positive_map=pmap, offsets=list(offsets), num_dropped=len(names) - kept,
    )


def _tokenize_pooled(tokenizer: TextTokenizer, names: list[str]) -> TokenizedPrompt:
    encoded = []
    for i, raw in enumerate(names):
        name = normalize_name(raw)
        if not name:
            raise SurgDinoError(f"class name {i} ({raw!r}) is empty; every category needs a name for the text prompt")
        ids, _ = tokenizer.encode(name)
        if len(ids) > tokenizer.max_length:
            ids = ids[: tokenizer.max_length - 1] + [tokenizer.sep_id]
        encoded.append(ids)
    c, length = len(encoded), max(len(ids) for ids in encoded)
    input_ids = torch.full((c, length), tokenizer.pad_id, dtype=torch.long)  # [C, L]
    attention_mask = torch.zeros(c, length, dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    positions = torch.arange(length).expand(c, length)
    return TokenizedPrompt(
        mode="pooled", names=names, caption=" . ".join(normalize_name(n) for n in names) + " .",
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids),
        position_ids=positions.clone(), encoder_mask=attention_mask,
        text_mask=torch.ones(c, dtype=torch.bool), self_attention_mask=torch.eye(c, dtype=torch.bool),
        text_position_ids=torch.zeros(c, dtype=torch.long), positive_map=torch.eye(c), offsets=[],
    )


def encode_prompt(encoder: TextEncoder, prompt: TokenizedPrompt) -> torch.Tensor:
    """Text features ``[1, T, D]`` of a prompt (one batched encoder call in either mode).

    A frozen encoder's features are computed once per prompt and kept on it (recomputed when the
    encoder's weights change, e.g. a checkpoint is loaded): 500 pooled names cost one encoder pass in
    all, not one per training step.
    """
    params = list(encoder.parameters())
    device = params[0].device
    frozen = getattr(encoder, "frozen", False) or not any(q.requires_grad for q in params)
    stochastic = any(m.training for m in list(encoder.modules())[1:])  # dropout on? (off in a frozen TextEncoder)
    key = (id(encoder), str(device), stochastic, tuple(q._version for q in params)) if frozen else None
    if key is not None and prompt._cache is not None and prompt._cache[0] == key:
        return prompt._cache[1]
    p = prompt.to(device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        hidden = encoder(p.input_ids, attention_mask=p.encoder_mask, position_ids=p.position_ids,
                         token_type_ids=p.token_type_ids)  # [N, L, D]
        feats = encoder.pool(hidden, p.input_ids, p.attention_mask)[None] if prompt.mode == "pooled" else hidden
    if key is not None:
        prompt._cache = (key, feats)  # [1, T, D]
    return feats


def class_scores(token_probs: torch.Tensor, positive_map: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``[..., C]`` from token probabilities ``[..., T']`` (T' ≥ T, e.g. padded to 256): the
    mean probability over each class's tokens (Open-GroundingDino's post-processing)."""
    t = positive_map.shape[1]
    return token_probs[..., :t] @ positive_map.to(token_probs).t()


def _word(text: str, start: int, end: int) -> tuple[int, int]:
    """The whitespace-delimited word of ``text`` holding characters ``start:end``."""
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    return start, end


def phrases(prompt: TokenizedPrompt, token_probs: torch.Tensor, text_threshold: float) -> list[str]:
    """The reference's phrase of each detection: the prompt's words at tokens scoring > ``text_threshold``
    (``token_probs [N, T']``); special tokens and phrase delimiters are left out, and a word-piece stands for
    its whole word ("cl" of "clamp" gives "clamp"; the reference would print "cl"). Pooled: the class names."""
    t = prompt.num_tokens
    keep = token_probs[:, :t].detach().cpu() > text_threshold  # [N, T]
    if prompt.mode == "pooled":
        return [" ".join(prompt.names[j] for j in row.nonzero().flatten().tolist()) for row in keep]
    in_name = prompt.positive_map.bool().any(0).cpu()  # [T]
    out = []
    for row in keep & in_name:
        pieces: list[list[int]] = []
        for j in row.nonzero().flatten().tolist():
            s, e = _word(prompt.caption, *prompt.offsets[j])
            if pieces and s < pieces[-1][1]:
                continue  # another piece of the same word
            if pieces and prompt.caption[pieces[-1][1]:s].strip() == "":
                pieces[-1][1] = e  # contiguous in the caption: one piece ("14.5 cm", "allis")
            else:
                pieces.append([s, e])
        out.append(" ".join(prompt.caption[s:e] for s, e in pieces))
    return out
