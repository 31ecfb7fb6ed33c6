"""``surgdino demo --quick``: dataset generation, a few MaskDINO iterations, evaluation, drawings, summary."""

from __future__ import annotations

import os

from surgdino.cli import main


def test_demo_config_is_packaged_and_valid():
    from surgdino.config import load_config
    from surgdino.engine.demo import demo_config_path

    path = demo_config_path()
    assert os.path.isfile(path)
    cfg = load_config(path)
    assert cfg.MODEL.BACKBONE.NAME == "convnext_atto" and cfg.MODEL.DEVICE == "auto"


def test_demo_config_fits_demo_data():
    """The demo trains DI-MaskDINO at the generated trays' own size, with their classes and enough queries."""
    from surgdino.config import load_config
    from surgdino.engine.demo import DEMO_DATA, demo_config_path

    cfg = load_config(demo_config_path())
    size = DEMO_DATA["image_size"]
    assert cfg.MODEL.MaskDINO.TRANSFORMER_DECODER_NAME == "DIMaskDINODecoder"
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == [size] and cfg.INPUT.MAX_SIZE_TRAIN == size
    assert cfg.INPUT.MIN_SIZE_TEST == size and cfg.INPUT.MAX_SIZE_TEST == size
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == DEMO_DATA["num_classes"] >= 3
    assert DEMO_DATA["instances_per_image"][1] <= cfg.MODEL.MaskDINO.NUM_OBJECT_QUERIES
    assert DEMO_DATA["instances_per_image"][1] <= cfg.TEST.DETECTIONS_PER_IMAGE


def test_demo_checkpoints_regularly():
    from surgdino.engine.demo import DEMO_DATA, demo_config, demo_dataset_paths

    cfg = demo_config("/tmp/x", demo_dataset_paths("/tmp/d", DEMO_DATA))
    assert 0 < cfg.SOLVER.CHECKPOINT_PERIOD <= 100 < cfg.SOLVER.MAX_ITER and cfg.SOLVER.MAX_TO_KEEP == 1


def test_demo_quick(tmp_path, capsys):
    out, data = tmp_path / "demo", tmp_path / "data"
    args = ["demo", "--quick", "--output", str(out), "--data-root", str(data)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SurgDINO demo: DI-MaskDINO" in printed and "outputs in" in printed
    assert "time:" in printed and "mask AP50" in printed and "box AP" in printed  # the summary
    assert printed.count("Per-class segm AP") == 1 and printed.count("AP75") == 1  # the tables once
    for f in ("model_final.pth", "config.yaml", "metrics.jsonl", "log.txt", "model_0000002.pth"):
        assert (out / f).is_file(), f
    assert (out / "inference" / "demo_trays_val" / "results.json").is_file()
    assert len([n for n in os.listdir(out / "predictions") if n.endswith(".png")]) == 4
    assert (out / "predictions" / "coco_results.json").is_file()
    # a second run reuses the generated dataset
    assert len(os.listdir(data)) == 1

    # the finished demo is not replaced silently; an interrupted one continues with --resume
    final = (out / "model_final.pth").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0] and "--output" in err[0], err
    assert (out / "model_final.pth").read_bytes() == final
    (out / "model_final.pth").unlink()  # as if stopped after the checkpoint at 2
    (out / "last_checkpoint").write_text("model_0000002.pth")
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in (out / "log.txt").read_text() and "mask AP50" in printed
    assert (out / "model_final.pth").is_file()
