"""CLI via typer's CliRunner (JPEG part; the tiny-model part lives in test_models.py)."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import rewards
from rewards.cli import app

runner = CliRunner()


def _png(path, seed, flat=False):
    rng = np.random.default_rng(seed)
    arr = np.full((40, 40, 3), 128, np.uint8) if flat else rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_list_json_parses():
    res = runner.invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)
    assert [e["name"] for e in entries] == rewards.available()
    by = {e["name"]: e for e in entries}
    assert by["pickscore"]["differentiable"] is True and by["jpeg_compressibility"]["differentiable"] is False
    assert "yuvalkirstain/PickScore_v1" in by["pickscore"]["weights"]
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "differentiable" in table.stdout and "hpsv2.1" in table.stdout


def test_score_jpeg_json_matches_api(tmp_path):
    a, b = _png(tmp_path / "a.png", 0, flat=True), _png(tmp_path / "b.png", 1)
    res = runner.invoke(app, ["score", "--reward", "jpeg_incompressibility", "--prompt", "x", str(a), str(b),
                              "--json", "--option", "quality=90"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    expected, _ = rewards.load("jpeg_incompressibility", quality=90)([Image.open(a), Image.open(b)], None, None)
    got = [r["score"] for r in out["results"]]
    assert got == expected.tolist() and got[0] < got[1]
    assert out["results"][0]["prompt"] == "x"
    table = runner.invoke(app, ["score", "-r", "jpeg_compressibility", "-p", "x", str(a)])
    assert table.exit_code == 0
    q95, _ = rewards.load("jpeg_compressibility")([Image.open(a)])
    assert f"{q95[0].item():.6g}" in table.stdout


def test_score_errors_exit_2_without_traceback(tmp_path):
    a = _png(tmp_path / "a.png", 0)
    for args, msg in [
        (["score", "--reward", "nope", str(a)], "unknown reward 'nope'"),
        (["score", "--reward", "jpeg_compressibility", str(tmp_path / "missing.png")], "not found"),
        (["score", "--reward", "jpeg_compressibility", "--option", "bogus=1", str(a)], "no option"),
        (["score", "--reward", "jpeg_compressibility", "--option", "novalue", str(a)], "key=value"),
        (["score", "--reward", "jpeg_compressibility", "-p", "a", "-p", "b", "-p", "c", str(a)], "3 --prompt"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.stderr and "Traceback" not in res.output + res.stderr
