"""SurgeryCLIP: a CLIP ViT whose last blocks carry CLIP Surgery's value–value attention path.

The surgery path is part of the module from construction (no rewrite at first forward), runs
out of place with autograd, and keeps the OpenAI/open_clip state-dict layout, so weights load from
and save back to open_clip unchanged. In each surgery block one qkv projection feeds two
``scaled_dot_product_attention`` calls: softmax(q·kᵀ/√d)·v for the original stream and
softmax(v·vᵀ/√d)·v for the surgery stream, which starts from the hidden state entering the first
surgery block, takes its v from the original stream and skips the FFN. The CLS token comes from
the original stream, the patch tokens from the surgery stream.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from surgdino.errors import CheckpointError, SurgDinoError
from surgdino.log import get_logger
from surgdino.modeling.backbone.surgeryclip_checkpoint import CLIPArch, read_clip_checkpoint

logger = get_logger(__name__)

ACTIVATIONS = ("quick_gelu", "gelu")
# Position-embedding interpolation: CLIP Surgery's bilinear (align_corners False, the default) or open_clip's bicubic.
POS_INTERPOLATIONS = ("bilinear", "bicubic")


class QuickGELU(nn.Module):
    """x·σ(1.702x): the GELU approximation OpenAI CLIP (and models fine-tuned from it) was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(act: str) -> nn.Module:
    if act == "quick_gelu":
        return QuickGELU()
    if act == "gelu":
        return nn.GELU()
    raise SurgDinoError(f"MODEL.SURGERYCLIP.ACT = {act!r} is not one of {list(ACTIVATIONS)} (or 'auto')")


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names; optionally also the v–v path."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                surgery: bool = False, vv_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (q–k attention output, v–v attention output), each after ``out_proj`` or None when not asked for."""
        b, n, c = x.shape
        if vv_only:  # only the surgery path: project v alone
            v = F.linear(x, self.in_proj_weight[2 * c:], self.in_proj_bias[2 * c:])  # [B, N, C]
            return None, self._vv(v.view(b, n, self.heads, c // self.heads).transpose(1, 2), attn_mask)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3C]
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # 3 × [B, h, N, C/h]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # [B, h, N, C/h]
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, c))  # [B, N, C]
        return out, (self._vv(v, attn_mask) if surgery else None)

    def _vv(self, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(v·vᵀ/√d)·v per head, then ``out_proj``: ``[B, h, N, C/h] → [B, N, C]``."""
        b, h, n, d = v.shape
        vv = F.scaled_dot_product_attention(v, v, v, attn_mask=attn_mask)  # [B, h, N, C/h]
        return self.out_proj(vv.transpose(1, 2).reshape(b, n, h * d))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (OpenAI layout: ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj) with an optional surgery stream."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", _activation(act)),
                                              ("c_proj", nn.Linear(mlp_width, width))]))
        self.surgery = False

    def forward(self, x: torch.Tensor, surgery_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, vv_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(original stream, surgery stream) → both after this block; the surgery stream skips the FFN.

        ``vv_only`` computes the surgery stream alone (the original stream is returned unchanged): for the
        last block when only patch tokens are wanted, as its original stream then feeds nothing but CLS.
        """
        attn_out, vv_out = self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal, surgery=self.surgery,
                                     vv_only=vv_only and self.surgery)
        if vv_out is not None:
            surgery_x = (x if surgery_x is None else surgery_x) + vv_out
        if attn_out is None:
            return x, surgery_x
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, surgery_x


class Transformer(nn.Module):
    """A stack of ``resblocks`` (OpenAI key layout)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_width, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                need_final: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(original stream, surgery stream or None); ``need_final=False`` may skip the last block's original stream."""
        surgery_x = None
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            x, surgery_x = block(x, surgery_x, attn_mask=attn_mask, is_causal=is_causal, vv_only=not need_final and i == last)
        return x, surgery_x


class VisionTransformer(nn.Module):
    """CLIP's image tower; position embeddings interpolated (cached) for any token grid.

    ``pos_interp``: "bilinear" (align_corners False, no antialiasing) as CLIP Surgery resizes them, or
    "bicubic" (antialiased) as open_clip's ``resize_pos_embed`` does; both equal at the pre-training grid.
    """

    def __init__(self, *, width: int, layers: int, heads: int, mlp_width: int, patch_size: int, grid_size: int,
                 output_dim: int, act: str = "quick_gelu", surgery_depth: int = 6, pos_interp: str = "bilinear"):
        super().__init__()
        if pos_interp not in POS_INTERPOLATIONS:
            raise SurgDinoError(f"MODEL.SURGERYCLIP.POS_INTERP = {pos_interp!r} is not one of {list(POS_INTERPOLATIONS)}")
        self.pos_interp = pos_interp
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.width = width
        self.output_dim = output_dim
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid_size * grid_size + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_width, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self._pos_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.set_surgery_depth(surgery_depth)

    @property
    def surgery_depth(self) -> int:
        return sum(bool(b.surgery) for b in self.transformer.resblocks)

    def set_surgery_depth(self, depth: int) -> None:
        """Put the v–v path into the last ``depth`` blocks (0 = plain CLIP)."""
        layers = len(self.transformer.resblocks)
        if not 0 <= depth <= layers:
            raise SurgDinoError(f"MODEL.SURGERYCLIP.SURGERY_DEPTH = {depth} is outside 0..{layers} "
                                f"(this CLIP has {layers} blocks)")
        for i, block in enumerate(self.transformer.resblocks):
            block.surgery = i >= layers - depth

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an image of this size (sides padded up to a multiple of the patch)."""
        p = self.patch_size
        return -(-height // p), -(-width // p)

    def pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position table ``[1 + gh*gw, C]`` for a gh×gw grid; the stored table is never modified."""
        table = self.positional_embedding
        if (gh, gw) == (self.grid_size, self.grid_size):
            return table
        differentiable = torch.is_grad_enabled() and table.requires_grad
        key = (gh, gw, self.pos_interp, table.device, table.dtype, table.data_ptr(), table._version)
        if not differentiable and key in self._pos_cache:
            self._pos_cache.move_to_end(key)
            return self._pos_cache[key]
        g, c = self.grid_size, table.shape[1]
        grid = table[1:].reshape(1, g, g, c).permute(0, 3, 1, 2).float()  # [1, C, g, g]
        if self.pos_interp == "bilinear":  # CLIP Surgery
            grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)  # [1, C, gh, gw]
        else:  # open_clip
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
        out = torch.cat([table[:1], grid.to(table.dtype).permute(0, 2, 3, 1).reshape(gh * gw, c)])  # [1+gh*gw, C]
        if not differentiable:
            self._pos_cache[key] = out.detach()
            while len(self._pos_cache) > 16:
                self._pos_cache.popitem(last=False)
        return out

    def _batch_pos(self, gh: int, gw: int, sizes: list[tuple[int, int]] | None) -> torch.Tensor:
        """``[1 or B, 1+gh*gw, C]``: each image's valid token region gets a table interpolated to its own size."""
        if sizes is None or all(s == (gh, gw) for s in sizes):
            return self.pos_embed(gh, gw)[None]
        per_size = {}
        for h, w in set(sizes):
            t = self.pos_embed(h, w)
            patch = F.pad(t[1:].reshape(h, w, -1), (0, 0, 0, gw - w, 0, gh - h))  # [gh, gw, C], zeros in padding
            per_size[(h, w)] = torch.cat([t[:1], patch.reshape(gh * gw, -1)])
        return torch.stack([per_size[s] for s in sizes])  # [B, 1+gh*gw, C]

    def forward_tokens(self, images: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens before ``ln_post``: ``[B, 1+N, width]``; CLS from the original stream, patches from the surgery stream.

        Images are CLIP-normalised ``[B, 3, H, W]``; ``token_mask [B, h, w]`` (True = padding) keeps padded tokens
        out of attention, and each image's valid region gets position embeddings sized to it.
        """
        x, surgery_x = self._run(images, token_mask, need_cls=True)
        if surgery_x is None:
            return x
        return torch.cat([x[:, :1], surgery_x[:, 1:]], dim=1)  # [B, 1+N, C]

    def patch_tokens(self, images: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens only, ``[B, N, width]`` (row-major over the token grid), skipping work that only feeds CLS."""
        x, surgery_x = self._run(images, token_mask, need_cls=False)
        return (x if surgery_x is None else surgery_x)[:, 1:]

    def _run(self, images: torch.Tensor, token_mask: torch.Tensor | None,
             need_cls: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, _, h, w = images.shape
        gh, gw = self.token_grid(h, w)
        if (gh * self.patch_size, gw * self.patch_size) != (h, w):
            images = F.pad(images, (0, gw * self.patch_size - w, 0, gh * self.patch_size - h))  # [B, 3, gh*p, gw*p]
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, C, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)  # [B, 1, C]
        attn_mask, sizes = None, None
        if token_mask is not None and bool(token_mask.any()):
            valid = ~token_mask  # [B, gh, gw]
            rows = valid.any(2).flip(1).to(torch.int8).argmax(1)  # trailing padded rows
            cols = valid.any(1).flip(1).to(torch.int8).argmax(1)
            sizes = [(max(gh - int(r), 1), max(gw - int(c), 1)) for r, c in zip(rows, cols)]
            keys = torch.cat([valid.new_ones(b, 1), valid.flatten(1)], dim=1)  # [B, 1+N]
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, 1+N], True = attend
        x = torch.cat([cls, x], dim=1) + self._batch_pos(gh, gw, sizes).to(x.dtype)  # [B, 1+N, C]
        x = self.ln_pre(x)
        return self.transformer(x, attn_mask=attn_mask, need_final=need_cls or self.surgery_depth == 0)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` then ``proj``: ``[..., width] → [..., output_dim]``."""
        return self.ln_post(tokens) @ self.proj


def _tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    try:
        import open_clip

        return open_clip.tokenize(texts, context_length=context_length)
    except (ImportError, FileNotFoundError, OSError) as e:
        raise SurgDinoError(f"cannot tokenize text: open_clip's BPE vocabulary is unavailable ({e}); reinstall "
                            "open_clip_torch (pip install --force-reinstall open_clip_torch) or pass token ids") from e


class SurgeryCLIP(nn.Module):
    """CLIP (image tower with CLIP Surgery, optional text tower) in the OpenAI/open_clip state-dict layout."""

    def __init__(self, arch: CLIPArch, *, surgery_depth: int = 6, act: str = "quick_gelu", text: bool = True,
                 pos_interp: str = "bilinear"):
        super().__init__()
        self.arch = arch
        self.visual = VisionTransformer(width=arch.width, layers=arch.layers, heads=arch.heads, mlp_width=arch.mlp_width,
                                        patch_size=arch.patch_size, grid_size=arch.grid_size, output_dim=arch.output_dim,
                                        act=act, surgery_depth=surgery_depth, pos_interp=pos_interp)
        self.has_text = bool(text and arch.has_text)
        if self.has_text:
            tw = arch.text_width
            self.context_length = arch.context_length
            self.token_embedding = nn.Embedding(arch.vocab_size, tw)
            self.positional_embedding = nn.Parameter(torch.randn(arch.context_length, tw) * 0.01)
            self.transformer = Transformer(tw, arch.text_layers, arch.text_heads, arch.text_mlp_width, act)
            self.ln_final = nn.LayerNorm(tw)
            self.text_projection = nn.Parameter(torch.randn(tw, arch.output_dim) * tw ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(1/0.07)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, surgery_depth: int = 6, act: str = "auto", text: bool = True,
                        heads: int | None = None, text_heads: int | None = None,
                        pos_interp: str = "bilinear") -> SurgeryCLIP:
        """Build from an OpenAI (TorchScript or state dict), open_clip or RemoteCLIP ViT checkpoint, in float32.

        ``act="auto"`` picks QuickGELU, right for OpenAI weights and models fine-tuned from them (RemoteCLIP);
        open_clip models trained from scratch with GELU (e.g. LAION ``ViT-B-32``) need ``act="gelu"``.
        ``heads`` / ``text_heads``: attention heads of the image / text tower, for checkpoints whose heads are
        not 64 wide (default: width / 64). ``pos_interp``: see ``VisionTransformer``.
        """
        ckpt = read_clip_checkpoint(os.fspath(path), heads=heads, text_heads=text_heads)
        if act == "auto":
            act = "quick_gelu"
        model = cls(ckpt.arch, surgery_depth=surgery_depth, act=act, text=text, pos_interp=pos_interp)
        sd = ckpt.state_dict
        if not model.has_text:
            sd = {k: v for k, v in sd.items() if k.startswith("visual.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            parts = ([f"missing {missing[:5]}"] if missing else []) + ([f"unsupported {unexpected[:5]}"] if unexpected else [])
            raise CheckpointError(f"{ckpt.path}: not a plain OpenAI-style CLIP ViT ({'; '.join(parts)}); variants with "
                                  "extra layers (layer scale, attention pooling, custom text towers) are not supported")
        a = ckpt.arch
        logger.info("SurgeryCLIP from %s (%s): ViT width %d, %d blocks, %d heads, patch %d, grid %d, output %d, "
                    "surgery in last %d blocks, activation %s%s", ckpt.path, ckpt.source, a.width, a.layers, a.heads,
                    a.patch_size, a.grid_size, a.output_dim, surgery_depth, act,
                    ", text tower" if model.has_text else "")
        return model

    @property
    def surgery_depth(self) -> int:
        return self.visual.surgery_depth

    def encode_image_with_all_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` (CLIP-normalised) → ``[B, 1+N, width]`` before ``ln_post``; N = token grid, row-major."""
        return self.visual.forward_tokens(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → ``[B, 1+N, output_dim]`` after ``ln_post`` and ``proj`` (as upstream CLIP Surgery)."""
        return self.visual.project(self.visual.forward_tokens(images))

    def encode_text(self, tokens: torch.Tensor | list[str] | str) -> torch.Tensor:
        """Token ids ``[T, context]`` (open_clip's tokenizer) or strings → ``[T, output_dim]`` (not normalised)."""
        if not self.has_text:
            raise SurgDinoError("this SurgeryCLIP has no text tower (built with text=False or from an image-only "
                                "checkpoint); build it with SurgeryCLIP.from_checkpoint(path, text=True)")
        if isinstance(tokens, str):
            tokens = [tokens]
        if isinstance(tokens, (list, tuple)):
            tokens = _tokenize(list(tokens), self.context_length)
        tokens = tokens.to(self.token_embedding.weight.device)
        if tokens.shape[-1] != self.context_length:
            raise SurgDinoError(f"token ids have length {tokens.shape[-1]}, the text tower expects {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding  # [T, L, C]
        x, _ = self.transformer(x, is_causal=True)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # [T, C] at the end-of-text token
        return x @ self.text_projection  # [T, output_dim]


def clip_feature_surgery(image_features: torch.Tensor, text_features: torch.Tensor,
                         redundant_feats: torch.Tensor | None = None, t: float = 2.0) -> torch.Tensor:
    """CLIP Surgery's feature surgery: ``[B, N, C] × [T, C] → [B, N, T]`` similarities with redundant features removed.

    ``image_features`` hold the CLS token first (as ``encode_image`` returns them). As upstream, the class
    weights come from the CLS token alone, w = softmax(t·s_cls) / mean(softmax(t·s_cls)) (one weight per
    class and image, shared by every token), and the result is w·s − mean_T(w·s) with s = image·textᵀ:
    upstream's element-wise products, weighted, minus their class mean, summed over channels, in closed
    form (no [B, N, T, C] tensor). Upstream hard-codes t = 2, the default here.
    """
    if redundant_feats is not None:
        return image_features @ (text_features - redundant_feats).t()
    sim = image_features @ text_features.t()  # [B, N, T]
    w = (sim[:, :1] * t).softmax(-1)  # [B, 1, T] from the CLS token
    w = w / w.mean(-1, keepdim=True)  # weights restraining the obvious classes
    weighted = w * sim
    return weighted - weighted.mean(-1, keepdim=True)


def similarity_map(sm: torch.Tensor, shape: tuple[int, int], grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Patch similarities ``[B, N, T]`` → min-max normalised maps ``[B, H, W, T]`` (bilinear), as upstream.

    ``grid`` (h, w) is the token grid for non-square inputs; by default the grid is taken as square.
    """
    lo, hi = sm.min(1, keepdim=True)[0], sm.max(1, keepdim=True)[0]
    sm = (sm - lo) / (hi - lo).clamp_min(torch.finfo(sm.dtype).tiny)
    if grid is None:
        side = round(sm.shape[1] ** 0.5)
        if side * side != sm.shape[1]:
            raise SurgDinoError(f"similarity_map: {sm.shape[1]} tokens are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    sm = sm.reshape(sm.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)  # [B, T, h, w]
    sm = F.interpolate(sm, size=tuple(shape), mode="bilinear", align_corners=False)  # [B, T, H, W]
    return sm.permute(0, 2, 3, 1)  # [B, H, W, T]
