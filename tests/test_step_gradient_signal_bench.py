"""benchmarks/step_gradient_signal.py on the shipped tiny-shapes model (4 samples): per-step numbers exist, are
finite, and show the final DDIM step's outsized gradient (its std is tiny) that train.skip_final_steps exists for."""

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "step_gradient_signal.py"


def test_per_step_signal_table():
    spec = importlib.util.spec_from_file_location("step_gradient_signal", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (res,) = bench.main(["--samples", "4", "--seeds", "0", "--steps", "10", "--json"])
    assert len(res["norm"]) == len(res["cos"]) == len(res["cum_cos"]) == 10
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in res["cos"] + res["cum_cos"])
    assert res["cum_cos"][0] == res["cos"][0] and res["all_but_last_cos"] == res["cum_cos"][8]
    # the last step (DDIM std ~0.03 vs >= 0.2 before) has by far the largest score-function gradient
    assert res["norm"][-1] > 3 * max(res["norm"][:-1])
