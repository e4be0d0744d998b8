"""benchmarks/gpu_flow_throughput.py: the --tiny CPU smoke run of both flow families (SD3, FLUX) prints the table
and writes JSON with finite, positive throughputs for sampling and training with and without gradient
checkpointing; the SD3.5-medium / FLUX.1-dev-sized run refuses to start without CUDA (exit 2, pointing at --tiny).
Runs the script's main in-process (one import of torch / diffusers for the whole file)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import diffusers
import pytest
import torch
import transformers

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_flow_throughput.py"
COLUMNS = ["model", "dtype", "phase", "samples x steps", "samples/s", "transition-steps/s", "s/iter", "peak GiB"]
SMOKE = ["--tiny", "--device", "cpu", "--iters", "1", "--warmup", "0", "--steps", "2", "--batch", "2",
         "--train-batch", "1", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_flow_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(autouse=True)
def _isolated():
    """main() seeds the LoRA init from the global RNG and quiets the libraries' loggers: undo both."""
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    with torch.random.fork_rng(devices=[]):
        yield
    diffusers.utils.logging.set_verbosity(levels[0])
    transformers.utils.logging.set_verbosity(levels[1])


def table_rows(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells and set(cells[1]) == {"---"}, stdout
    return cells[0], cells[2:]


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_tiny_cpu_run_both_families(bench, tmp_path, capsys):
    out = tmp_path / "flow.json"
    assert bench.main([*SMOKE, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    header, rows = table_rows(stdout)
    assert header == COLUMNS
    phases = ["sampling", "train", "train+ckpt"]
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, "fp32", p) for m in ("sd3", "flux") for p in phases]
    for r in rows:
        cell = dict(zip(COLUMNS, r, strict=True))
        assert cell["samples x steps"] == ("2 x 2" if cell["phase"] == "sampling" else "1 x 2")
        for column in ("samples/s", "transition-steps/s", "s/iter"):
            assert math.isfinite(float(cell[column])) and float(cell[column]) > 0, (column, stdout)
        assert float(cell["transition-steps/s"]) == pytest.approx(2 * float(cell["samples/s"]), rel=1e-2)
        assert cell["peak GiB"] == "n/a"  # CPU

    result = json.loads(out.read_text())
    setup = result["setup"]
    assert setup["tiny"] and setup["num_steps"] == 2 and setup["sde_steps"] == 2 and setup["train_steps"] == 2
    assert setup["batch"] == 2 and setup["train_batch"] == 1 and setup["grad_ckpt"] == ["off", "on"]
    assert set(setup["models"]) == {"sd3", "flux"}
    for name, model in setup["models"].items():
        assert model["params_m"]["transformer"] > 0 and model["image_tokens"] == 16, name
    assert setup["models"]["sd3"]["guidance"].startswith("cfg") and setup["models"]["flux"]["guidance"].startswith("embedded")
    assert {"torch", "diffusers", "transformers", "peft"} <= set(setup["versions"])
    assert positive(result["elapsed_s"])
    assert len(result["rows"]) == 6
    for row in result["rows"]:
        assert row["note"] is None and row["trainable_params"] > 0
        assert len(row["timing"]["seconds"]) == 1 and all(positive(s) for s in row["timing"]["seconds"])
        assert row["timing"]["finite"] and row["timing"]["peak_gib"] is None
        for key in ("seconds_per_iter", "samples_per_s", "transition_steps_per_s"):
            assert positive(row[key]), (key, row)
        assert row["transition_steps_per_s"] == pytest.approx(row["samples_per_s"] * row["steps"])


def test_tiny_sde_window_trains_only_sde_steps(bench, tmp_path, capsys):
    out = tmp_path / "window.json"
    argv = [*SMOKE, "--steps", "3", "--sde-window", "1", "--models", "flux", "--grad-ckpt", "on", "--out", str(out)]
    assert bench.main(argv) == 0
    _, rows = table_rows(capsys.readouterr().out)
    assert [(r[2], r[3]) for r in rows] == [("sampling", "2 x 3"), ("train+ckpt", "1 x 1")]
    result = json.loads(out.read_text())
    assert result["setup"]["sde_window"] == 1 and result["setup"]["train_steps"] == 1
    assert all(positive(r["samples_per_s"]) for r in result["rows"])
    with pytest.raises(SystemExit):  # ODE steps have no log-prob to train
        bench.parse_args([*SMOKE, "--steps", "3", "--sde-window", "1", "--train-steps", "2"])
    capsys.readouterr()


def test_full_size_needs_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    captured = capsys.readouterr()
    assert "needs a CUDA GPU" in captured.err and "--tiny" in captured.err
    assert captured.out == ""
