"""The command line as a new user meets it: fast help, options anywhere, clear errors for folders, missing
or deeply nested files, the README's examples, ``--threads``."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from surgdino.cli import build_parser, main
from surgdino.config import load_config
from surgdino.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = "surgdino://demo/dimaskdino_atto_trays.yaml"
DEEP = "[" * 30000 + "]" * 30000


def _run(args, capsys) -> tuple[int, list[str]]:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def test_parser_help_and_argument_errors_import_no_torch():
    """Building the parser (``surgdino --help``, a mistyped option) imports neither torch, torchvision
    nor the evaluation stack."""
    code = ("import sys\nfrom surgdino.cli import main\n"
            "for argv in (['--help'], ['train', '--bogus'], ['train', 'SOLVER.MAX_ITER', '3', '--bogus'], ['predict', '--help'], ['check-backbone', '--bogus']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'torchvision', 'numpy', 'surgdino.evaluation.coco_evaluator') "
            "if m in sys.modules]\nprint('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "HEAVY []" in out, out[-500:]


def test_every_computing_command_has_threads():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for path in (["train"], ["predict"], ["demo"], ["evaluate"], ["check-backbone"], ["data", "check"],
                 ["data", "synth"], ["data", "show"], ["convert", "convnext"]):
        parser = sub[path[0]]
        for name in path[1:]:
            parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        assert any("--threads" in a.option_strings for a in parser._actions), path


def test_threads_sets_torch_threads(capsys):
    before, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    try:
        rc = main(["check-backbone", "--sizes", "32x32", "--repeats", "1", "MODEL.BACKBONE.NAME", "convnext_atto",
                   "--threads", "1"])  # also after the overrides
        assert rc == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert interop >= 1
    rc, err = _run(["check-backbone", "--threads", "0"], capsys)
    assert rc == 2 and "must be at least 1" in err[-1]


@pytest.mark.parametrize("where", ["before", "after"])
def test_option_value_error_same_wherever_it_stands(where, tmp_path, capsys):
    """``--score-threshold high`` before or after the ``KEY VALUE`` pairs: the same argparse error, exit 2."""
    opt = ["--score-threshold", "high"]
    pairs = ["MODEL.WEIGHTS", "w.pth"]
    base = ["predict", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    rc, err = _run(base + (opt + pairs if where == "before" else pairs + opt), capsys)
    assert rc == 2
    assert "argument --score-threshold: invalid float value: 'high'" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_options_after_overrides_are_parsed(tmp_path, capsys):
    rc, err = _run(["train", "SOLVER.MAX_ITER", "3", "--config-file", str(tmp_path / "no.yaml")], capsys)
    assert rc == 2 and "config file not found" in err[-1]  # --config-file was taken, not a config key
    rc, err = _run(["train", "SOLVER.MAX_ITER", "3", "--resum"], capsys)
    assert rc == 2 and "unrecognized argument: --resum" in err[-1]


def test_predict_help_shows_default_threshold_and_required(capsys):
    from surgdino.engine import demo
    from surgdino.engine.cli import SCORE_THRESHOLD

    assert SCORE_THRESHOLD == demo.DRAW_SCORE_THRESHOLD  # one default for predict and the demo's drawings
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"default {SCORE_THRESHOLD}" in out
    usage = out.split("usage:")[1].split("options")[0]
    assert "--input IMAGES --output DIR" in usage and "[--input" not in usage
    assert "required arguments" in out


def test_folder_where_a_file_is_expected(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model_final.pth").write_bytes(b"")
    cases = [
        ["config", "show", "--config-file", str(tmp_path)],
        ["train", "--config-file", str(tmp_path)],
        ["config", "show", "MODEL.WEIGHTS", str(tmp_path / "w")],
        ["data", "check", "--annotations", str(tmp_path), "--image-root", str(tmp_path)],
    ]
    for args in cases:
        rc, err = _run(args, capsys)
        assert rc == 2 and len(err) == 1 and "is a directory" in err[0], (args, err)
    assert "model_final.pth" in _run(cases[2], capsys)[1][0]  # names the file inside


def test_missing_config_suggests_a_path_that_exists(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a user outside the repository
    rc, err = _run(["config", "show", "--no-check", "--config-file", "configs/demo/dimaskdino_atto_trays.yaml"], capsys)
    assert rc == 2
    suggested = re.search(r"did you mean (\S+)\?", err[0]).group(1)
    assert suggested == DEMO and load_config(suggested).MODEL.BACKBONE.NAME == "convnext_atto"
    rc, err = _run(["train"], capsys)
    assert rc == 2 and DEMO in err[0]


def test_deep_nesting_is_one_clear_line(tmp_path, capsys):
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("SOLVER:\n  STEPS: " + DEEP + "\n")
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"images": ' + DEEP + "}")
    deep_map = tmp_path / "map.yaml"
    deep_map.write_text("".join(" " * i + "a:\n" for i in range(3000)))
    cases = [
        (["config", "show", "--config-file", str(deep_yaml)], str(deep_yaml)),
        (["config", "show", "--config-file", str(deep_map)], str(deep_map)),
        (["config", "show", "SOLVER.STEPS", DEEP], "nested"),
        (["config", "show", "SOLVER.STEPS", "- " * 5000], "nested"),
        (["data", "check", "--annotations", str(deep_json), "--image-root", str(tmp_path)], str(deep_json)),
        (["evaluate", "--annotations", str(deep_json), "--results", str(deep_json)], str(deep_json)),
    ]
    for args, expect in cases:
        rc, err = _run(args, capsys)
        one = 2 if args[:2] == ["data", "check"] else 1  # data check: its problem, then the count line
        assert rc == 2 and len(err) == one and "nested" in err[0] and expect in err[0], (args[:2], err)


def test_readme_dataset_example_loads(tmp_path):
    """The README's ``DATASETS`` block (``{NAME, JSON, IMAGE_ROOT}``) is accepted as written."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "REGISTER" in b)
    path = tmp_path / "cfg.yaml"
    path.write_text(block)
    cfg = load_config(str(path))
    item = cfg.DATASETS.REGISTER[0]
    assert set(item) == {"name", "json_file", "image_root"}
    assert item["json_file"] == str(tmp_path / yaml.safe_load(block)["DATASETS"]["REGISTER"][0]["JSON"])
    # the same spelling on the command line, and the error for a really missing name
    reg = json.dumps([{"JSON": "a.json", "IMAGE_ROOT": "imgs"}])
    with pytest.raises(ConfigError, match=r"DATASETS.REGISTER\[0\] is missing name") as e:
        load_config(None, ["DATASETS.REGISTER", reg])
    assert "no name" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean image_root"):
        load_config(None, ["DATASETS.REGISTER", json.dumps([{"name": "a", "json": "a.json", "image_rot": "x"}])])


def test_check_backbone_readme_example_parses_overrides(capsys):
    """``check-backbone --sizes 224x224 480x640 MODEL.BACKBONE.NAME ...`` (the README's line): the first
    token that is not HxW starts the overrides."""
    rc = main(["check-backbone", "--sizes", "32x32", "32x48", "MODEL.BACKBONE.NAME", "convnext_atto",
               "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "backbone convnext_atto" in out and "[32x48]" in out
    rc, err = _run(["check-backbone", "--sizes", "32", "MODEL.BACKBONE.NAME", "convnext_atto"], capsys)
    assert rc == 2 and "not HxW" in err[0]


def test_threads_auto_takes_every_core_only_when_idle(monkeypatch):
    """``--threads auto`` (the demo's default): every core under a 1-minute load average of 0.5, else 1."""
    import surgdino.cliutil as cu

    monkeypatch.setattr(cu.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cu.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert cu.auto_threads() == 2
    monkeypatch.setattr(cu.os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    assert cu.auto_threads() == 1
    assert cu.threads_value("auto") == "auto" and cu.threads_value("3") == 3
    demo = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    assert next(a for a in demo._actions if a.dest == "threads").default == "auto"
    before = torch.get_num_threads()
    try:
        cu.set_threads("auto")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
