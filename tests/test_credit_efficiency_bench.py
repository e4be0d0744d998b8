"""benchmarks/credit_efficiency.py end to end on the tiny pipeline (2 methods, 1 seed, 2 epochs), plus its analysis."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "benchmarks" / "credit_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("credit_efficiency_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_csv_table_and_plot(bench, tmp_path):
    out = tmp_path / "out"
    sets = [  # the smallest geometry tiny.yaml allows: 2 steps, 2 samples per epoch, 1 eval prompt
        "sample.num_steps=2", "sample.batch_size=2", "sample.images_per_prompt=2", "train.batch_size=2",
        "credit.window=1", "credit.min_count=2", "eval.prompts=[a red circle]",
    ]
    rows = bench.run_benchmark(
        str(REPO / "configs" / "tiny.yaml"), ["sparse", "coca_select"], [0], epochs=2, eval_every=1,
        out=out, runs_dir=tmp_path / "runs", sets=sets, threads=1,
    )
    with open(out / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [
            "method", "seed", "epoch", "reward_queries", "eval_mean", "train_reward_mean", "wall_s"
        ]
        got = list(reader)
    assert len(got) == len(rows) == 2 * 3  # 2 methods x (eval before + after epoch 1 + after epoch 2)
    for method in ("sparse", "coca_select"):
        mine = [r for r in got if r["method"] == method]
        assert [int(r["reward_queries"]) for r in mine] == [0, 2, 4]  # 2 queries per epoch
        assert all(math.isfinite(float(r["eval_mean"])) for r in mine)
        assert float(mine[-1]["wall_s"]) > 0
    # same seed, same model, same eval seed: identical eval before training, computed by the first run only
    # (the second gets it through train(eval_before=...) and draws no before-grid)
    assert len({r["eval_mean"] for r in got if r["epoch"] == "0"}) == 1
    drew_before = {d.name for d in (tmp_path / "runs").iterdir() if (d / "images" / "eval_before.png").exists()}
    assert drew_before == {"sparse_s0"}

    table = (out / "table.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    # the main table, then the secondary training-reward table
    assert [line.split("|")[1].strip() for line in body] == ["sparse", "coca_select"] * 2
    assert "ratio vs sparse" in table and "train reward, late epochs" in table
    assert (out / "curve.png").stat().st_size > 1000
    assert (tmp_path / "runs" / "coca_select_s0" / "bench.json").exists()


def test_first_reach_and_ratio(bench):
    """Interpolated crossing of sparse's final seed-mean, ratios, 'not reached'."""
    rows = []
    curves = {"sparse": [0.0, 0.1, 0.2], "coca": [0.0, 0.2, 0.3], "uniform": [0.0, 0.05, 0.1]}
    for method, ys in curves.items():
        for seed, shift in ((0, -0.01), (1, 0.01)):
            for e, y in enumerate(ys):
                train = "" if e == 0 else y + 0.5
                if e:  # an epoch without evaluation before each eval point (eval every 2 epochs)
                    rows.append({"method": method, "seed": seed, "epoch": 2 * e - 1, "reward_queries": 20 * e - 10,
                                 "eval_mean": "", "train_reward_mean": train, "wall_s": 10.0 * e - 5})
                rows.append({"method": method, "seed": seed, "epoch": 2 * e, "reward_queries": 20 * e,
                             "eval_mean": y + (shift if e else 0.0), "train_reward_mean": train, "wall_s": 10.0 * e})
    s = bench.summarise(rows)
    assert s["target"] == pytest.approx(0.2)
    assert s["methods"]["sparse"]["ratio"] == pytest.approx(1.0)
    assert s["methods"]["coca"]["queries_to_reach"] == pytest.approx(20.0)
    assert s["methods"]["coca"]["ratio"] == pytest.approx(2.0)
    assert s["methods"]["coca"]["wall_to_reach"] == pytest.approx(10.0)
    # train reward of the last half of the 4 epochs: epochs 3 and 4 = y2 + 0.5 (y = the method's eval curve)
    assert s["methods"]["coca"]["train_late_mean"] == pytest.approx(0.8)
    assert s["methods"]["coca"]["train_late_delta_mean"] == pytest.approx(0.1)
    assert s["methods"]["uniform"]["ratio"] is None
    assert "not reached" in bench.table_markdown(rows)
    assert bench.first_reach([0, 10], [0.0, 1.0], 0.25) == (2.5, None)


def test_eval_before_training_does_not_depend_on_the_training_seed():
    """The premise of the benchmark's eval-before cache: with LoRA's up-projection at zero the untrained model is
    the base model whatever the seed that drew the down-projection, so the fixed-seed eval is the same in every run."""
    import torch
    from accelerate.utils import set_seed

    from diffusion_rl.evaluation import evaluate
    from diffusion_rl.models import load_pipeline, prepare_trainable_denoiser

    images, lora_a = [], []
    for seed in (0, 1):
        set_seed(seed)
        pipe = load_pipeline("builtin:tiny-random")
        params = prepare_trainable_denoiser(pipe, True, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
        lora_a.append(params[0].detach().clone())
        _, imgs, _ = evaluate(pipe, pipe.unet, ["a red circle"], [], seed=1234, num_steps=2)
        images.append(imgs)
    assert not torch.equal(lora_a[0], lora_a[1])  # the seeds did draw different adapters
    assert torch.equal(images[0], images[1])


def test_every_method_resolves_to_a_valid_config_that_differs_only_in_its_overrides(bench, tmp_path):
    """The methods of the shipped benchmark command on the shipped default: each resolves (the config rules
    hold), trains the expected number of steps, and differs from the others only in credit and step selection."""
    cfgs = {m: bench.run_config(str(REPO / "configs" / "default.yaml"), [], m, 0, 5, 1, tmp_path, 0.34)
            for m in bench.DDIM_METHODS}
    steps = {m: c.num_train_timesteps() for m, c in cfgs.items()}
    assert steps == {"sparse": 9, "sparse_random": 3, "uniform": 9, "coca": 9, "coca_select": 3}
    assert cfgs["sparse_random"].train.timestep_selection == "random"
    assert cfgs["coca_select"].train.timestep_selection == "credit"
    # the default's best-of-run selection is off: a learning curve ends with the last epoch's weights
    assert all(c.validation.prompts == [] for c in cfgs.values())

    def rest(c):
        d = c.model_dump(mode="json")
        d.pop("output_dir")
        d["credit"].pop("kind")
        for k in ("timestep_selection", "timestep_fraction"):
            d["train"].pop(k)
        return d

    assert all(rest(c) == rest(cfgs["sparse"]) for c in cfgs.values())


def test_flow_methods_resolve_on_the_flow_default(bench, tmp_path):
    """Flow-GRPO (all SDE steps but the last), Flow-GRPO-Fast (a 2-step SDE window), CoCA and CoCA + selection."""
    cfgs = {m: bench.run_config(str(REPO / "configs" / "flow_default.yaml"), [], m, 0, 5, 1, tmp_path, 0.34)
            for m in bench.FLOW_METHODS}
    assert {m: c.num_train_timesteps() for m, c in cfgs.items()} == {"sparse": 9, "windowed": 2, "coca": 9,
                                                                     "coca_select": 3}
    assert cfgs["windowed"].sample.sde_window_size == 2 and cfgs["sparse"].sample.sde_window_size is None
