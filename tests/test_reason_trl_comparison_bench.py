"""benchmarks/reason_trl_comparison.py end to end on the tiny workload (2 steps per side): the printed table has a
drl row and a TRL row with positive step times and a drl / TRL ratio, and the JSON holds every step of both."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "benchmarks" / "reason_trl_comparison.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="trl is not importable (it is in drl's dev extra: pip install -e '.[dev]')")


def test_tiny_two_steps_prints_both_sides_and_ratio(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--workload", "tiny", "--steps", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    number = r"(\d+\.\d+)"
    rows = {}
    for name in ("drl step", "TRL GRPOTrainer step"):
        m = re.search(rf"^\s+{re.escape(name)}\s+{number}\s+{number}\s+{number}\s+{number}", text, re.M)
        assert m, text
        wall, cpu, gen, train = map(float, m.groups())
        assert wall > 0 and cpu > 0 and gen > 0 and train > 0, m.group(0)
        rows[name] = wall
    m = re.search(rf"^\s+ratio drl / TRL\s+{number}\s+{number}", text, re.M)
    assert m, text
    ratio = float(m.group(1))
    assert math.isclose(ratio, rows["drl step"] / rows["TRL GRPOTrainer step"], rel_tol=0.05, abs_tol=2e-3)
    assert re.search(r"target drl <= 0\.7 x TRL: wall (met|NOT met), cpu (met|NOT met)", text), text

    data = json.loads(out.read_text())
    tiny = data["results"]["tiny"]
    assert tiny["steps"] == 2 and tiny["model"]["vocab"] < 200
    for kind in ("drl", "trl"):
        run = tiny["runs"][kind]
        assert len(run["step_s"]) == len(run["generate_s"]) == len(run["train_s"]) == 2
        assert all(x > 0 for x in run["step_s"] + run["step_cpu_s"])
        assert all(0 < x <= 16 for x in run["completion_len"])  # at most max_new_tokens
        assert run["torch_threads"] == 1
    assert tiny["summary"]["ratio"]["wall"] > 0
    assert data["versions"]["trl"].startswith("1.16")
