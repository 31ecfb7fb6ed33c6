"""The GroundingDINO meta-architecture (``MODEL.META_ARCHITECTURE GroundingDINO``): per-image dicts in;
weighted losses (train) or per-image ``{"boxes", "scores", "labels"}`` (eval) out, as MaskDINO.

Class names come from the dataset metadata (``class_names``) and become the prompt; ``forward_hf``
and ``from_hf_pretrained`` give transformers' interface for checkpoint parity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from surgdino.errors import SurgDinoError
from surgdino.modeling.grounding.detector import GroundingDINODetector
from surgdino.modeling.grounding.prompts import TokenizedPrompt, encode_prompt, tokenize_prompt
from surgdino.modeling.layers.geometry import box_xyxy_to_cxcywh
from surgdino.registry import META_ARCH_REGISTRY
from surgdino.structures import batch_images


def loss_view(out: dict) -> dict:
    """The detector's outputs as the shared ``SetCriterion`` reads them: every prediction's token logits
    finite (0 off the text, where the focal loss must not see -inf) with ``logit_mask`` = the text tokens."""
    valid = out["text_valid"]

    def view(p: dict) -> dict:
        return dict(p, pred_logits=p["pred_logits"].masked_fill(~valid[:, None], 0.0), logit_mask=valid)

    res = dict(view(out), aux_outputs=[view(p) for p in out["aux_outputs"]], interm_outputs=view(out["interm_outputs"]))
    if "dn_outputs" in out:
        res["dn_outputs"] = [view(p) for p in out["dn_outputs"]]
    return res


@META_ARCH_REGISTRY.register("GroundingDINO")
class GroundingDINO(GroundingDINODetector):
    """Detector + (optional) criterion, post-processing and prompt of class names."""

    def __init__(self, *, criterion=None, postprocessor=None, class_names: Sequence[str] = (),
                 prompt_mode: str = "caption", pixel_mean: list[float] | None = None,
                 pixel_std: list[float] | None = None, size_divisibility: int = 32, **detector_kwargs):
        super().__init__(**detector_kwargs)
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.prompt_mode = prompt_mode
        self.class_names = list(class_names)
        self._prompt: TokenizedPrompt | None = None
        self._text_cache: tuple[TokenizedPrompt, torch.Tensor] | None = None
        self.size_divisibility = max(size_divisibility, getattr(self.backbone, "size_divisibility", 0) or 0)
        mean = pixel_mean or [123.675, 116.28, 103.53]
        std = pixel_std or [58.395, 57.12, 57.375]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Keyword arguments of the model described by ``cfg`` (``MODEL.GDINO.*``)."""
        from surgdino.modeling.grounding.build import grounding_dino_kwargs

        return grounding_dino_kwargs(cfg)

    @classmethod
    def from_hf_pretrained(cls, folder: str) -> GroundingDINO:
        """A transformers ``GroundingDinoForObjectDetection`` folder (config.json + model.safetensors)."""
        from surgdino.modeling.grounding.hf import detector_kwargs, load_hf_state_dict, read_hf_folder

        config, state = read_hf_folder(folder)
        model = cls(**detector_kwargs(config))
        load_hf_state_dict(model, state, source=folder)
        return model.eval()

    def forward_hf(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """transformers' inputs (``pixel_mask`` 1 = image) → ``{"logits" [B, Q, 256], "pred_boxes" [B, Q, 4]}``."""
        b, _, h, w = pixel_values.shape
        pad = (torch.zeros(b, h, w, dtype=torch.bool, device=pixel_values.device) if pixel_mask is None
               else ~pixel_mask.bool())
        text = self.encode_text(input_ids, attention_mask, token_type_ids)
        out = self.forward_tensors(pixel_values, pad, **text)
        logits = out["pred_logits"]  # [B, Q, T]; transformers pads the tokens to max_text_len with -inf
        logits = F.pad(logits, (0, max(self.max_text_len - logits.shape[-1], 0)), value=float("-inf"))
        return {"logits": logits, "pred_boxes": out["pred_boxes"]}

    # --- the engine's interface ---
    def set_class_names(self, names: Sequence[str]) -> None:
        """The prompt's classes, in label order (the engine passes the dataset's ``thing_classes``)."""
        self.class_names = [str(n) for n in names]
        self._prompt = self._text_cache = None

    def prompt(self, names: Sequence[str] | None = None) -> TokenizedPrompt:
        """The tokenized prompt of ``names`` (default: the class names; cached)."""
        if names is not None:
            return tokenize_prompt(self.text_encoder.tokenizer, list(names), mode=self.prompt_mode,
                                   max_text_len=self.max_text_len, sub_sentence=self.sub_sentence_present)
        if self._prompt is None:
            if not self.class_names:
                raise SurgDinoError("GroundingDINO has no class names for its prompt: register the dataset "
                                    "(DATASETS.TRAIN/TEST with categories) or set MODEL.GDINO.CLASS_NAMES")
            self._prompt = self.prompt(self.class_names)
        return self._prompt

    def text_inputs(self, prompt: TokenizedPrompt, batch: int) -> dict[str, torch.Tensor]:
        """Text features of ``prompt`` (encoded once) expanded to the batch: the detector's text arguments."""
        dev = self.pixel_mean.device
        frozen = not any(p.requires_grad for p in self.text_encoder.parameters())
        if frozen and self._text_cache is not None and self._text_cache[0] is prompt:
            feats = self._text_cache[1]  # a frozen encoder gives the same features for the same prompt
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                feats = encode_prompt(self.text_encoder, prompt)  # [1, T, Dt]
            self._text_cache = (prompt, feats) if frozen else None
        p = prompt.to(dev)
        return {"text": self.text_projection(feats).expand(batch, -1, -1),
                "text_valid": p.text_mask[None].expand(batch, -1),
                "text_blocked": ~p.self_attention_mask[None].expand(batch, -1, -1),
                "text_position_ids": p.text_position_ids[None].expand(batch, -1)}

    def _targets(self, batched_inputs: list[dict], prompt: TokenizedPrompt) -> list[dict]:
        dev = self.pixel_mean.device
        pmap = prompt.positive_map.to(dev)
        out = []
        for x in batched_inputs:
            inst = x["instances"]
            h, w = x["image"].shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=dev)
            labels = inst["classes"].to(dev).long()
            out.append({"boxes": box_xyxy_to_cxcywh(inst["boxes"].to(dev).float() / scale),
                        "class_vectors": (pmap[labels] > 0).float(), "labels": labels})
        return out

    def forward(self, batched_inputs: list[dict]):
        """MaskDINO's interface: ``[{"image": uint8 [3, H, W], "instances": {"boxes", "classes"}, "height",
        "width"}]`` → losses (train) or ``[{"boxes" xyxy original pixels, "scores", "labels"}]`` (eval)."""
        dev = self.pixel_mean.device
        images = [(x["image"].to(dev).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        batch = batch_images(images, self.size_divisibility)
        prompt = self.prompt()
        text = self.text_inputs(prompt, len(images))
        if self.training:
            targets = self._targets(batched_inputs, prompt)
            out = self.forward_tensors(batch.tensors, batch.mask, **text, targets=targets,
                                       class_maps=prompt.positive_map.to(dev))
            return self.criterion(loss_view(out), targets)
        out = self.forward_tensors(batch.tensors, batch.mask, **text)
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = images[i].shape[-2:]
            results.append(self.postprocessor(out["pred_logits"][i], out["pred_boxes"][i],
                                              prompt.positive_map.to(dev),
                                              out_size=(int(x.get("height", h)), int(x.get("width", w)))))
        return results
