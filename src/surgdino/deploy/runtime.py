"""An exported model in onnxruntime: the session, its validated metadata, raw outputs as torch tensors."""

from __future__ import annotations

import os
from typing import Any

import torch

from surgdino.deploy import metadata
from surgdino.errors import SurgDinoError


class OnnxModel:
    """``OnnxModel("model.onnx")(images_u8, pad_mask)`` → ``{raw output name: tensor}`` (onnxruntime, CPU
    unless ``providers`` says otherwise). ``meta`` is the file's parsed SurgDINO metadata; a file that
    is not a SurgDINO export (or of another format version) is refused with what is missing."""

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SurgDinoError(f"{path}: ONNX file not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable / invalid models
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SurgDinoError(f"{path}: onnxruntime cannot load it as an ONNX model ({first})") from None
        self.path = path
        self.meta: dict[str, Any] = metadata.parse(path, self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) != metadata.INPUTS:
            raise SurgDinoError(f"{path}: graph inputs are {names}, a SurgDINO export has {list(metadata.INPUTS)}; "
                                "re-export the model with `surgdino export`")
        self.output_names = [o.name for o in self.session.get_outputs()]
        batch = self.session.get_inputs()[0].shape[0]
        self.batch = batch if isinstance(batch, int) else None  # None = any batch size

    def __call__(self, images: torch.Tensor, pad_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` uint8 ``[B, 3, H, W]``, ``pad_mask`` bool ``[B, H, W]`` → raw outputs."""
        if self.batch is not None and images.shape[0] != self.batch:
            parts = [self(images[i:i + self.batch], pad_mask[i:i + self.batch])
                     for i in range(0, images.shape[0], self.batch)]
            return {k: torch.cat([p[k] for p in parts]) for k in self.output_names}
        feed = {"images": images.cpu().numpy(), "pad_mask": pad_mask.cpu().numpy()}
        return {k: torch.from_numpy(v) for k, v in zip(self.output_names, self.session.run(None, feed))}
