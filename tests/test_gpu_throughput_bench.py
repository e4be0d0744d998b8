"""benchmarks/gpu_throughput.py: the --tiny CPU smoke run prints the table with finite, positive throughputs,
and the SD1.5-sized run refuses to start without CUDA (exit 2, pointing at --tiny)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_throughput.py"
COLUMNS = [
    "dtype", "attention", "sampling samples/s", "sampling vs first", "train traj-steps/s",
    "train samples/s (K=2)", "train vs first", "peak GiB sampling", "peak GiB training",
]


def run_script(*args: str, hide_cuda: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the no-GPU branch, also on a machine that has one
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def table_rows(stdout: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows as cells) of the markdown table in stdout."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells and set(cells[1]) == {"---"}, stdout
    return cells[0], cells[2:]


def test_tiny_cpu_run_prints_table(tmp_path):
    out = tmp_path / "result.json"
    proc = run_script("--tiny", "--device", "cpu", "--iters", "1", "--steps", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, rows = table_rows(proc.stdout)
    assert header == COLUMNS
    by_config = {(r[0], r[1]): r for r in rows}
    assert list(by_config) == [("fp32", "sdpa"), ("fp32", "xformers")]  # CPU default: fp32 only, both backends

    sdpa = dict(zip(COLUMNS, by_config["fp32", "sdpa"], strict=True))
    for column in ("sampling samples/s", "train traj-steps/s", "train samples/s (K=2)"):
        value = float(sdpa[column])
        assert math.isfinite(value) and value > 0, (column, proc.stdout)
    assert sdpa["sampling vs first"] == sdpa["train vs first"] == "1.00"
    assert float(sdpa["train traj-steps/s"]) == pytest.approx(2 * float(sdpa["train samples/s (K=2)"]), rel=1e-2)
    assert sdpa["peak GiB sampling"] == sdpa["peak GiB training"] == "n/a"
    # xformers is CUDA-only: the row says why it was not measured
    assert by_config["fp32", "xformers"][2] in {"xformers: not installed", "xformers: needs CUDA"} or by_config[
        "fp32", "xformers"
    ][2].startswith("xformers: not importable")

    result = json.loads(out.read_text())
    assert result["setup"]["model"] == "tiny" and result["setup"]["num_steps"] == 2
    (measured,) = [r for r in result["rows"] if r["note"] is None]
    assert len(measured["sampling"]["seconds"]) == len(measured["training"]["seconds"]) == 1
    assert measured["trainable_params"] > 0
    assert measured["sampling"]["finite"] and measured["training"]["finite"]


@pytest.mark.parametrize("extra", [[], ["--device", "cpu"]], ids=["default-device", "device-cpu"])
def test_full_size_needs_cuda(extra):
    proc = run_script(*extra, hide_cuda=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "--tiny" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
