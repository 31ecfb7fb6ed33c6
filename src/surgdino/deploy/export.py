"""``surgdino export``: a MaskDINO / DI-MaskDINO / GroundingDINO checkpoint → an ONNX file that checks itself.

The graph is ``ExportModule`` (uint8 images + padding mask → raw head outputs, opset 18), or for a
GroundingDINO ``GroundingExportModule``: its dataset's class names are the prompt, whose text features are
computed at export and baked in (class names and the token → class map in the metadata); the
checkpoint's EMA weights are used when it has them (``load_weights`` prefers them); preprocessing,
post-processing settings, class names and the config go into the metadata (``deploy.metadata``).
Before the file is written under its name, onnxruntime runs it on two samples (the full input, and a
smaller image padded to it) and its raw outputs and final detections are compared with PyTorch's.

Exporter: the TorchScript one (``torch.onnx.export(dynamo=False)``). By default at a fixed input size
and batch 1: smaller images are padded to it (``pad_mask``), so one file serves every image the test
resize gives. With ``dynamic`` the batch, height and width are free (``dynamic_axes``): the traced
forward reads every level size from the tracer's shape values (``spatial_shapes_as_list`` and
``shape_tensor`` keep them out of Python ints and constants), so position encodings, reference points,
level splits and mask resizing follow the input. The query selections are ``TopK`` with a fixed k, so a
dynamic graph needs at least k encoder tokens: ``min_dynamic_side`` is stored in the metadata and
the predictor pads smaller images up to it. The self-check then runs two input sizes of different shape.
The dynamo exporter (``dynamo=True``) is not used: it needs onnxscript (not a dependency), and its capture,
``torch.export.export`` with dynamic height/width (torch 2.14), stops on constraint violations: Python
comparisons of level sizes (which level is finest, ``min(k, tokens)`` of the selections) specialise them.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import numpy as np
import torch

from surgdino.config import Config
from surgdino.deploy import metadata
from surgdino.deploy.graph import ExportModule, GroundingExportModule
from surgdino.errors import SurgDinoError
from surgdino.log import get_logger

logger = get_logger(__name__)

OPSET = 18
RAW_ATOL = 1e-4  # raw outputs: |onnx - torch| <= RAW_ATOL * max(1, |torch|max) per output


def settings(cfg: Config, model: torch.nn.Module, *, height: int | None = None, width: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(preprocess, postprocess)`` settings of ``cfg`` as the metadata stores them (the PyTorch
    predictor uses the same, so both paths preprocess and post-process alike). ``height``/``width``:
    the fixed input every image is padded to (None: padded to the size divisibility only). A
    GroundingDINO's post-processing is its prompt's ``positive_map`` (set its class names first) and
    ``predict --prompt``'s box threshold."""
    from surgdino.modeling.maskdino.postprocess import InstancePostProcessor

    if callable(getattr(model, "set_class_names", None)):  # GroundingDINO: predict --prompt's box threshold
        from surgdino.engine.grounded_predictor import BOX_THRESHOLD

        post = {"box_threshold": BOX_THRESHOLD, "positive_map": model.prompt().positive_map.tolist()}
    else:
        post = dict(InstancePostProcessor.from_config(cfg))  # the keyword arguments InstancePostProcessor takes
    pre = {"min_size": int(cfg.INPUT.MIN_SIZE_TEST), "max_size": int(cfg.INPUT.MAX_SIZE_TEST),
           "format": cfg.INPUT.FORMAT, "size_divisibility": int(model.size_divisibility),
           "height": height, "width": width,
           "pixel_mean": list(cfg.MODEL.PIXEL_MEAN), "pixel_std": list(cfg.MODEL.PIXEL_STD)}
    return pre, post


def default_size(cfg: Config, divisibility: int) -> int:
    """A square side that holds every test-resized image: the longest side rounded up to ``divisibility``."""
    side = max(int(cfg.INPUT.MAX_SIZE_TEST), int(cfg.INPUT.MIN_SIZE_TEST), divisibility)
    return -(-side // divisibility) * divisibility


def min_dynamic_side(model: torch.nn.Module) -> int:
    """The smallest square input side (a multiple of the size divisibility) of a dynamic export: its encoder
    tokens must hold the decoder's largest query selection (``TopK`` with a fixed k in the graph)."""
    div = max(1, int(model.size_divisibility))
    pd, dec = model.pixel_decoder, model.decoder
    k = max(int(getattr(dec, "num_queries", 0)), int(getattr(dec, "first_selected_queries", 0) or 0))
    shapes = model.backbone.output_shape()
    strides = [shapes[f].stride for f in pd.enc_features]
    strides += [strides[-1] * 2 ** (i + 1) for i in range(pd.num_extra)]  # extra levels: 3x3 convs, stride 2

    def tokens(side: int) -> int:
        return sum((-(-side // s)) ** 2 for s in strides)

    side = div
    while tokens(side) < k:
        side += div
    return side


def _sample(height: int, width: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 image batch ``[B, 3, H, W]`` (smooth pattern + noise) and a pad mask with the last image
    padded by a quarter at the bottom and an eighth at the right."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2]) * 180  # [3, H, W]
    images = (base[None] + 60 * torch.rand(batch, 3, height, width, generator=g)).clamp(0, 255).to(torch.uint8)
    pad = torch.zeros(batch, height, width, dtype=torch.bool)
    pad[-1, height - height // 4:] = True
    pad[-1, :, width - width // 8:] = True
    return images, pad


def _failing_part(e: BaseException) -> str:
    """``file:line (function)`` of the deepest frame of the error inside the surgdino model code."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}surgdino{os.sep}" in f.filename
              and f"{os.sep}deploy{os.sep}" not in f.filename]
    if not frames:
        return "the model"
    f = frames[-1]
    rel = f.filename.split(f"{os.sep}surgdino{os.sep}", 1)[-1]
    return f"surgdino/{rel}:{f.lineno} ({f.name})"


DYNAMIC_AXES = {"images": {0: "batch", 2: "height", 3: "width"}, "pad_mask": {0: "batch", 1: "height", 2: "width"}}


GROUNDING_DYNAMIC = ("--dynamic: a GroundingDINO exports at a fixed --height/--width only (its forward turns the "
                     "level sizes into Python ints: surgdino/modeling/grounding/detector.py, forward_tensors); "
                     "smaller images are padded to it")


def _export(module: torch.nn.Module, sample: tuple[torch.Tensor, torch.Tensor], path: str, *,
            dynamic: bool = False) -> None:
    """The TorchScript exporter at the sample's size (batch 1), or with free batch, height and width."""
    import warnings

    try:
        with warnings.catch_warnings(), torch.no_grad():
            # shape checks and structural choices (level order, k of the selections) are constants of the graph
            warnings.simplefilter("ignore")
            torch.onnx.export(module, sample, path, dynamo=False, opset_version=OPSET,
                              input_names=list(metadata.INPUTS), output_names=list(module.outputs),
                              dynamic_axes=DYNAMIC_AXES if dynamic else None)
    except Exception as e:  # the exporter's errors are long; the user needs the part and the reason
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SurgDinoError(f"export failed in {_failing_part(e)}: {type(e).__name__}: {first} "
                            "(run with --debug for the full trace)") from e


def raw_difference(got: np.ndarray, want: np.ndarray) -> float:
    """``|got - want|`` max relative to ``max(1, |want| max)`` over finite entries; inf where the non-finite
    entries (a GroundingDINO's -inf logits beyond its prompt) differ."""
    finite = np.isfinite(want)
    if not (np.isfinite(got) == finite).all() or not (got[~finite] == want[~finite]).all():
        return float("inf")
    if not finite.any():
        return 0.0
    return float(np.abs(got[finite] - want[finite]).max()) / max(1.0, float(np.abs(want[finite]).max()))


def _compare(module: torch.nn.Module, session: Any, sample: tuple[torch.Tensor, torch.Tensor],
             post: dict[str, Any]) -> dict[str, float]:
    """Worst raw-output difference and detection agreement of onnxruntime vs PyTorch on ``sample``."""
    from surgdino.deploy.postprocess import match_detections, postprocess

    images, pad = sample
    names = module.outputs
    with torch.no_grad():
        want = dict(zip(names, module(images, pad)))
    got = dict(zip(names, session.run(None, {"images": images.numpy(), "pad_mask": pad.numpy()})))
    rel = max(raw_difference(got[k], want[k].numpy()) for k in names)
    sizes = [((~p[:, 0]).sum().item(), (~p[0, :]).sum().item()) for p in pad]
    out_sizes = [(2 * h, 2 * w) for h, w in sizes]  # results at another size than the input, as with real images
    a = postprocess(got, sizes, out_sizes, post)
    b = postprocess(want, sizes, out_sizes, post)
    report = match_detections(a, b)
    report["raw_rel_diff"] = rel
    return report


def export_onnx(cfg: Config, output: str, *, height: int | None = None, width: int | None = None,
                dynamic: bool = False, verify: bool = True) -> dict[str, Any]:
    """Export ``cfg``'s model with ``MODEL.WEIGHTS`` (EMA weights if the checkpoint has them) to ``output``.

    Fixed input ``height`` × ``width`` (multiples of the size divisibility; default: the longest test
    side rounded up, square); with ``dynamic`` any batch and size (at least ``min_dynamic_side``), traced
    at ``height`` × ``width``. Returns the comparison report; raises ``SurgDinoError`` if onnxruntime
    disagrees with PyTorch."""
    import onnx
    import onnxruntime as ort

    from surgdino import __version__
    from surgdino.engine.predictor import Predictor as TorchPredictor

    if os.path.isdir(output):
        raise SurgDinoError(f"--output {output} is a folder; give the ONNX file to write, e.g. {output}/model.onnx")
    cfg = cfg.merge({"MODEL.DEVICE": "cpu"})
    torch_predictor = TorchPredictor(cfg)
    grounding = callable(getattr(torch_predictor.model, "set_class_names", None))
    if grounding and dynamic:
        raise SurgDinoError(GROUNDING_DYNAMIC)
    module = (GroundingExportModule(torch_predictor.model, list(torch_predictor.thing_classes)) if grounding
              else ExportModule(torch_predictor.model)).eval()
    div = max(1, int(torch_predictor.model.size_divisibility))
    side = default_size(cfg, div)
    height, width = height or side, width or side
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % div:
            raise SurgDinoError(f"{name} {v}: must be a positive multiple of {div} (the model's size divisibility)")
    if dynamic:
        min_side = min_dynamic_side(torch_predictor.model)
        if min(height, width) < min_side:
            raise SurgDinoError(f"--dynamic --height {height} --width {width}: trace at a side of at least {min_side} "
                                "(the decoder's query selection needs that many encoder tokens)")
        pre, post = settings(cfg, torch_predictor.model)
        pre["min_side"] = min_side
    else:
        pre, post = settings(cfg, torch_predictor.model, height=height, width=width)
    props = metadata.build(preprocess=pre, postprocess=post, class_names=torch_predictor.thing_classes,
                           config_yaml=cfg.dump(), dataset_ids=torch_predictor.contiguous_to_dataset_id,
                           weights=os.path.abspath(cfg.MODEL.WEIGHTS), version=__version__,
                           kind="grounding" if grounding else "instances")
    sample = _sample(height, width, 1, seed=0)
    tmp = output + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:
        _export(module, sample, tmp, dynamic=dynamic)
        proto = onnx.load(tmp)
        proto.doc_string = metadata.GRAPH_DOC
        del proto.metadata_props[:]
        for k, v in props.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, tmp)
        report: dict[str, Any] = {"opset": OPSET, "size": (height, width), "dynamic": dynamic}
        if verify:
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            if dynamic:  # another size and aspect, a batch of two with the second image padded
                h2 = max(pre["min_side"], -(-(3 * height // 4) // div) * div)
                other = _sample(h2, width + 2 * div, 2, seed=1)
            else:
                other = _sample(height, width, 1, seed=1)
                other[1][:] = True
                other[1][:, :max(div, height // 2), :max(div, width // 3)] = False  # a small image padded to the input
            checks = [sample, other]
            for i, s in enumerate(checks):
                r = _compare(module, session, s, post)
                report[f"check{i}"] = {"size": tuple(s[0].shape), **r}
                bad = r["raw_rel_diff"] > RAW_ATOL or not r["same"]
                if bad:
                    raise SurgDinoError(f"export check failed: onnxruntime differs from PyTorch on a sample of "
                                        f"{tuple(s[0].shape)} ({r}); the file was not written")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("exported %s: %s", output, report)
    return report
