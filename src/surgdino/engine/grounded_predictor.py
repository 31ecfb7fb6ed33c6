"""Prediction by free text with GroundingDINO: ``surgdino predict --prompt "mayo scissors . allis forceps"``.

The reference's semantics (IDEA's ``groundingdino.util.inference.predict``): a query is kept when
its best token probability exceeds ``box_threshold`` (that probability is its score), and its
phrase is the prompt's words at the tokens whose probability exceeds ``text_threshold``. Only the
tokens of the class names count (the reference also counts ``[SEP]`` and the dots). Each detection
also gets the label of the prompt class with the highest mean token probability, so results can be
written as COCO json: category ids are the dataset's when every prompt name is one of the dataset's
classes (or with no ``--prompt``: the dataset's class names), else the name's index in the prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from surgdino.config import Config
from surgdino.engine.predictor import Predictor
from surgdino.errors import ConfigError
from surgdino.modeling.grounding.postprocess import threshold_detections
from surgdino.modeling.grounding.prompts import normalize_name, phrases, split_prompt
from surgdino.structures import batch_images

BOX_THRESHOLD = 0.35  # IDEA GroundingDINO's README values
TEXT_THRESHOLD = 0.25


@torch.no_grad()
def grounded_detections(model: Any, image: torch.Tensor, out_size: tuple[int, int], *,
                        box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD
                        ) -> dict[str, Any]:
    """One image (uint8 ``[3, h, w]``, resized for the model) through a GroundingDINO with its current
    prompt → ``{"boxes" [K, 4] xyxy in ``out_size`` pixels, "scores" [K], "labels" [K], "phrases" [K]}``."""
    dev = model.pixel_mean.device
    img = (image.to(dev).float() - model.pixel_mean) / model.pixel_std
    batch = batch_images([img], model.size_divisibility)
    prompt = model.prompt()
    raw = model.forward_tensors(batch.tensors, batch.mask, **model.text_inputs(prompt, 1))
    out = threshold_detections(raw["pred_logits"][0], raw["pred_boxes"][0], prompt.positive_map, out_size,
                               box_threshold)
    probs = out.pop("probs")
    return dict(out, phrases=phrases(prompt, probs, text_threshold))


class GroundedPredictor(Predictor):
    """``Predictor`` for GroundingDINO with a text prompt (default: the dataset's class names)."""

    def __init__(self, cfg: Config, prompt: str | None = None, *, box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD):
        super().__init__(cfg)
        if not hasattr(self.model, "set_class_names"):
            raise ConfigError(f"--prompt, --box-threshold and --text-threshold need a GroundingDINO model "
                              f"(MODEL.META_ARCHITECTURE GroundingDINO), not {cfg.MODEL.META_ARCHITECTURE}")
        for name, v in (("--box-threshold", box_threshold), ("--text-threshold", text_threshold)):
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} {v} is outside [0, 1)")
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        dataset_names = list(self.thing_classes)
        names = split_prompt(prompt) if prompt else dataset_names
        if not names:
            raise ConfigError('no class names to look for: give --prompt "mayo scissors . allis forceps" or register '
                              "the dataset (DATASETS.TEST) whose categories the model was trained on")
        index = {normalize_name(n): i for i, n in enumerate(dataset_names)}
        if prompt and not all(normalize_name(n) in index for n in names):
            self.contiguous_to_dataset_id = None  # free text: category id = the name's index in the prompt
        elif prompt:
            ids = self.contiguous_to_dataset_id or {i: i for i in range(len(dataset_names))}
            self.contiguous_to_dataset_id = {j: ids[index[normalize_name(n)]] for j, n in enumerate(names)}
        self.thing_classes = names
        self.model.set_class_names(names)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, image_id: int = 0, file_name: str = "") -> dict[str, Any]:
        h, w = image.shape[:2]
        return grounded_detections(self.model, self._model_image(image), (h, w), box_threshold=self.box_threshold,
                                   text_threshold=self.text_threshold)
