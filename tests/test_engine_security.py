"""No code runs from files users hand in: every loading path gets a pickle whose unpickling would create
a marker file, and must refuse it in one line naming the file and the object; ``last_checkpoint`` may only
name a file inside the output folder."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
from test_engine_helpers import EngineTestNet, FakeDataTrainer, tiny_cfg

from surgdino.checkpoint_io import UnsafeCheckpointError, load_pickle_file
from surgdino.cli import main
from surgdino.engine.checkpointer import Checkpointer, load_weights
from surgdino.errors import CheckpointError


class _Payload:
    """Unpickling calls ``open(marker, "w")``: the marker file appears if the payload runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil(tmp_path, name: str, *, kind: str = "torch", around: dict | None = None) -> tuple[str, str]:
    """A weights file named ``name`` whose loading would create ``marker``; ``around`` holds real weights."""
    marker = str(tmp_path / f"MARKER_{name}")
    obj = {**(around or {}), "payload": _Payload(marker)}
    path = str(tmp_path / name)
    if kind == "torch":
        torch.save(obj, path)
    elif kind == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a detectron2-style pickle: numpy arrays around the payload
        obj = {k: ({n: t.numpy() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in obj.items()}
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path, marker


def _assert_refused(excinfo, path: str, marker: str) -> None:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UnsafeCheckpointError), msg
    assert path in msg and "refused for safety" in msg and re.search(r"\b(io|builtins|_io)\.open\b", msg), msg
    assert "\n" not in msg
    assert not os.path.exists(marker), "the payload ran"


@pytest.mark.parametrize("kind,name", [("torch", "w.pth"), ("legacy", "legacy.pth"), ("pickle", "w.pkl"),
                                       ("pickle", "plain_pickle_named.pth")])
def test_model_weights_refuse_payload(tmp_path, kind, name):
    """MODEL.WEIGHTS as a .pth (zip and legacy format), a detectron2 .pkl, and a plain pickle under a .pth
    name (once read with a raw-pickle fallback): refused, the payload never runs."""
    path, marker = _evil(tmp_path, name, kind=kind, around={"model": EngineTestNet().state_dict()})
    with pytest.raises(CheckpointError) as e:
        load_weights(EngineTestNet(), path)
    _assert_refused(e, path, marker)


def test_d2_pkl_with_numpy_arrays_loads(tmp_path):
    import numpy as np

    src = EngineTestNet()
    path = tmp_path / "ok.pkl"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in src.state_dict().items()}, "__author__": "x",
                         "shapes": np.int64(3)}, f, protocol=protocol)
        assert isinstance(load_pickle_file(str(path))["model"]["head.weight"], np.ndarray)
        dst = EngineTestNet()
        load_weights(dst, str(path))
        assert torch.equal(dst.head.weight, src.head.weight)
        renamed = tmp_path / "d2_pickle_named.pth"  # a .pkl under another name: same restricted unpickler
        renamed.write_bytes(path.read_bytes())
        dst = EngineTestNet()
        load_weights(dst, str(renamed))
        assert torch.equal(dst.head.weight, src.head.weight)


def test_resume_refuses_planted_checkpoint(tmp_path):
    """A planted ``model_*.pth`` named by last_checkpoint is refused on --resume, not run nor skipped silently."""
    out = tmp_path / "run"
    FakeDataTrainer(tiny_cfg(str(out), **{"SOLVER.MAX_ITER": 4})).train()
    good = torch.load(out / "model_final.pth", weights_only=False)
    path, marker = _evil(out, "model_0000009.pth", around=good)
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointError) as e:
        FakeDataTrainer(tiny_cfg(str(out), **{"SOLVER.MAX_ITER": 12}), resume=True)
    _assert_refused(e, path, marker)


def test_our_checkpoints_load_weights_only(tmp_path):
    """Our own files (RNG states with numpy arrays, schedule, EMA, hook states) load with weights_only."""
    out = tmp_path / "run"
    FakeDataTrainer(tiny_cfg(str(out), **{"SOLVER.MAX_ITER": 4, "MODEL_EMA.ENABLED": True})).train()
    obj = torch.load(out / "model_final.pth", weights_only=False)
    assert isinstance(obj["rng"][0]["numpy"][1], __import__("numpy").ndarray)
    resumed = Checkpointer(EngineTestNet(), str(out)).resume()
    assert resumed["iteration"] == 4


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.pth", "sub/model.pth", ".."])
def test_last_checkpoint_must_be_a_bare_file_name(tmp_path, name):
    out = tmp_path / "run"
    FakeDataTrainer(tiny_cfg(str(out), **{"SOLVER.MAX_ITER": 4})).train()
    (tmp_path / "outside.pth").write_bytes((out / "model_final.pth").read_bytes())
    (out / "last_checkpoint").write_text(name)
    with pytest.raises(CheckpointError, match="last_checkpoint: names .*refused for safety"):
        Checkpointer(EngineTestNet(), str(out)).resume()


def test_last_checkpoint_not_utf8_falls_back(tmp_path):
    out = tmp_path / "run"
    FakeDataTrainer(tiny_cfg(str(out), **{"SOLVER.MAX_ITER": 4})).train()
    (out / "last_checkpoint").write_bytes(b"\xff\xfe model")
    assert Checkpointer(EngineTestNet(), str(out)).resume()["iteration"] == 4


def test_predict_and_eval_only_refuse_payload(tmp_path):
    from surgdino.engine.predictor import Predictor
    from surgdino.engine.run import eval_only

    path, marker = _evil(tmp_path, "w.pth", around={"model": EngineTestNet().state_dict()})
    cfg = tiny_cfg(str(tmp_path / "o"), **{"MODEL.WEIGHTS": path, "DATASETS.TEST": "['none']"})
    with pytest.raises(CheckpointError) as e:
        Predictor(cfg)
    _assert_refused(e, path, marker)
    with pytest.raises(CheckpointError) as e:
        eval_only(cfg)
    _assert_refused(e, path, marker)


def test_cli_predict_and_convert_refuse_payload_in_one_line(tmp_path, capsys):
    """``surgdino predict`` and ``surgdino convert convnext --source x.pkl``: exit 2, one line, no traceback."""
    from PIL import Image

    Image.new("RGB", (32, 24)).save(tmp_path / "a.png")
    path, marker = _evil(tmp_path, "w.pth", around={"model": EngineTestNet().state_dict()})
    pkl, pkl_marker = _evil(tmp_path, "convnext.pkl", kind="pickle")
    cfgs = ["MODEL.META_ARCHITECTURE", "EngineTestNet", "MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"]
    for args, file, mark in [
        (["predict", "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "p"), *cfgs, "MODEL.WEIGHTS",
          path], path, marker),
        (["convert", "convnext", "--source", pkl, "--output", str(tmp_path / "c.pth")], pkl, pkl_marker),
    ]:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refused for safety" in err[0] and file in err[0], err
        assert not os.path.exists(mark)


def test_no_unsafe_load_anywhere_in_the_source():
    """Every ``torch.load`` in the package passes ``weights_only=True``; ``pickle.load(s)`` / ``Unpickler`` appear
    only in ``checkpoint_io`` (the restricted unpickler)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "src" / "surgdino"
    bad = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("torch.load"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") != "True":
                    bad.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") and path.name != "checkpoint_io.py":
                bad.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "unsafe loading:\n" + "\n".join(bad)
