"""Reading CLIP ViT checkpoints (OpenAI TorchScript or state dict, open_clip, RemoteCLIP) and inferring their shape.

Everything the model needs (width, layers, patch, grid, output dim, text tower) is read from the keys,
so one loader serves every flavour; anything that is not a CLIP ViT fails with a message that says so.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass

import torch

from surgdino.errors import CheckpointError

# Scalars OpenAI's TorchScript archives keep beside the weights.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
# Top-level names of the OpenAI/open_clip text tower.
_TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "logit_scale")
# Containers training scripts wrap the weights in (open_clip: "state_dict"; others: "model").
_CONTAINERS = ("state_dict", "model", "model_state_dict", "module")


@dataclass(frozen=True)
class CLIPArch:
    """Shape of a CLIP ViT (and optionally its text tower), as read from checkpoint keys."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    grid_size: int
    output_dim: int
    text_width: int | None = None
    text_layers: int | None = None
    text_heads: int | None = None
    text_mlp_width: int | None = None
    context_length: int | None = None
    vocab_size: int | None = None

    @property
    def has_text(self) -> bool:
        return self.text_width is not None

    @property
    def image_size(self) -> int:
        return self.patch_size * self.grid_size


@dataclass
class CLIPCheckpoint:
    """A checkpoint in canonical OpenAI/open_clip key layout (float32), its shape and where it came from."""

    state_dict: dict[str, torch.Tensor]
    arch: CLIPArch
    source: str  # "openai-torchscript" or "state-dict"
    path: str


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with ``constants.pkl`` and ``code/`` beside the data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in zf.namelist())


def _load_raw(path: str) -> tuple[object, str]:
    """Return (object, source): a TorchScript archive's state dict, or whatever ``torch.load`` finds."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: CLIP checkpoint not found; set MODEL.SURGERYCLIP.CKPT (or args.surgeryclip_ckpt) "
                              "to an existing .pt/.pth file")
    if path.endswith(".safetensors"):  # open_clip's hub files (open_clip_model.safetensors)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu"), "safetensors"
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download it") from e
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, OpenAI ships it anyway
                module = torch.jit.load(path, map_location="cpu")
        except RuntimeError as e:
            raise CheckpointError(f"{path}: unreadable TorchScript archive ({str(e).splitlines()[0]}); "
                                  "re-download the OpenAI checkpoint") from e
        return dict(module.state_dict()), "openai-torchscript"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # training scripts often save their args
            return torch.load(path, map_location="cpu", weights_only=True), "state-dict"
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or another format); "
                                  "re-download or re-save the file") from e
        raise CheckpointError(
            f"{path}: the checkpoint pickles the Python object {found.group(1)}, not loaded for safety; "
            "re-save only the weights with torch.save(model.state_dict(), path)") from e
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); re-download or re-save the file") from e


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside training-script containers (``state_dict``/``model``), drop ``module.``."""
    if isinstance(obj, dict):
        from surgdino.checkpoint_io import unwrap_state_dict

        obj = unwrap_state_dict(obj, _CONTAINERS)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state dict (name → tensor), possibly under 'state_dict' or 'model'; "
                              f"found {('a dict with keys ' + str(list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Bring the keys to the OpenAI layout (``visual.conv1.weight`` …), whatever wrapper prefix they carry."""
    keys = list(sd)
    if any(k.endswith("visual.attnpool.c_proj.weight") or ".layer1.0.conv1.weight" in k or k.startswith("visual.layer1.")
           for k in keys):
        raise CheckpointError(f"{path}: this is a ResNet CLIP (keys visual.layer1.*, visual.attnpool.*); SurgeryCLIP "
                              "needs a ViT CLIP (e.g. ViT-B/16, ViT-B/32, ViT-L/14 from OpenAI, open_clip or RemoteCLIP)")
    if any(k.startswith("vision_model.") or ".vision_model." in k for k in keys):
        raise CheckpointError(f"{path}: this is a HuggingFace transformers CLIP (keys vision_model.*); use the OpenAI or "
                              "open_clip checkpoint of the same model (e.g. open_clip_pytorch_model.bin)")
    if any(k.endswith("visual.trunk.patch_embed.proj.weight") for k in keys):
        raise CheckpointError(f"{path}: this open_clip model wraps a timm trunk (keys visual.trunk.*); SurgeryCLIP "
                              "supports the OpenAI-style ViT towers (keys visual.conv1, visual.transformer.resblocks)")
    cls_keys = [k for k in keys if k.endswith("class_embedding")]
    if not cls_keys or not any(k.endswith("conv1.weight") for k in keys):
        sample = ", ".join(keys[:4])
        raise CheckpointError(f"{path}: not a CLIP ViT checkpoint (no visual.class_embedding / visual.conv1.weight; "
                              f"keys start with {sample}); give an OpenAI, open_clip or RemoteCLIP ViT checkpoint")
    prefix = cls_keys[0][: -len("class_embedding")]  # "visual." for full models, "" for a bare visual tower
    if prefix.endswith("visual."):
        root = prefix[: -len("visual.")]
        out = {k[len(root):]: v for k, v in sd.items() if k.startswith(root)}
    else:
        out = {"visual." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    # Only CLIP's own keys: a detector checkpoint also holds its pyramid, heads, ...
    return {k: v for k, v in out.items() if k.startswith("visual.") or k.split(".")[0] in _TEXT_KEYS}


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def infer_arch(sd: dict[str, torch.Tensor], path: str = "<state dict>", heads: int | None = None,
               text_heads: int | None = None) -> CLIPArch:
    """Read width, layers, patch, grid, output dim (and the text tower) from OpenAI-layout keys.

    Head counts are not stored in a state dict: ``heads`` / ``text_heads`` default to width / 64.
    """
    try:
        conv = sd["visual.conv1.weight"]  # [width, 3, patch, patch]
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        n_pos = int(sd["visual.positional_embedding"].shape[0])
        layers = _count_blocks(sd, "visual.transformer.resblocks.")
        mlp_width = int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        proj = sd.get("visual.proj")
    except KeyError as e:
        raise CheckpointError(f"{path}: CLIP ViT checkpoint lacks {e.args[0]}; the file is incomplete or of another model") from e
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise CheckpointError(f"{path}: visual.positional_embedding has {n_pos} rows, not 1 + a square grid; "
                              "only square pre-training grids are supported")
    if proj is None:
        raise CheckpointError(f"{path}: visual.proj is missing; SurgeryCLIP needs the image projection of a CLIP ViT")
    heads = heads or max(1, width // 64)  # every OpenAI/open_clip ViT uses 64-wide heads
    if width % heads:
        raise CheckpointError(f"{path}: width {width} is not divisible by {heads} heads; pass heads explicitly "
                              "(MODEL.SURGERYCLIP.HEADS)")
    text = {}
    if "token_embedding.weight" in sd and "text_projection" in sd:
        tw = int(sd["ln_final.weight"].shape[0])
        text_heads = text_heads or max(1, tw // 64)
        if tw % text_heads:
            raise CheckpointError(f"{path}: text width {tw} is not divisible by {text_heads} heads; pass text_heads "
                                  "explicitly")
        text = dict(text_width=tw, text_layers=_count_blocks(sd, "transformer.resblocks."), text_heads=text_heads,
                    text_mlp_width=int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                    context_length=int(sd["positional_embedding"].shape[0]),
                    vocab_size=int(sd["token_embedding.weight"].shape[0]))
    return CLIPArch(width=width, layers=layers, heads=heads, mlp_width=mlp_width, patch_size=patch, grid_size=grid,
                    output_dim=int(proj.shape[1]), **text)


def read_clip_checkpoint(path: str, heads: int | None = None, text_heads: int | None = None) -> CLIPCheckpoint:
    """Load any supported CLIP ViT checkpoint into float32 OpenAI-layout keys plus its inferred shape."""
    path = os.fspath(path)
    raw, source = _load_raw(path)
    sd = _strip_prefix(_unwrap(raw, path), path)
    for k in _OPENAI_EXTRAS + ("attn_mask",):
        sd.pop(k, None)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # OpenAI weights are fp16
    return CLIPCheckpoint(state_dict=sd, arch=infer_arch(sd, path, heads, text_heads), source=source, path=path)
