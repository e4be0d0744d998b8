#!/usr/bin/env python
"""Sample efficiency of step-level credit: sparse (DDPO) vs uniform vs CoCA vs CoCA + credit-aware step selection.

Every run starts from the same model and the same base config; runs differ ONLY in the `credit.*` / step-selection
overrides of their method and in the seed. All runs get the same budget of reward queries (each sampled training
image is one query: sample.batch_size x sample.num_batches_per_epoch x processes per epoch). Evaluation (not counted
as queries) samples the held-out `eval.prompts` with the fixed `eval.seed` before training (query 0), every
`--eval-every` epochs (the trainer's periodic eval) and after the last epoch, so each run gives a curve of eval
reward versus reward queries.

Methods (the only overrides that differ between runs, besides `seed`):

    sparse         credit.kind=sparse   train.timestep_selection=all     train.timestep_fraction=1.0   (DDPO)
    sparse_random  credit.kind=sparse   train.timestep_selection=random  train.timestep_fraction=F     (DDPO's own
                   timestep_fraction: as many trained steps as coca_select, picked at random; the control that
                   separates "train fewer steps" from "train the steps CoCA credits")
    uniform        credit.kind=uniform  train.timestep_selection=all     train.timestep_fraction=1.0   (UCA by true step)
    coca           credit.kind=coca     train.timestep_selection=all     train.timestep_fraction=1.0
    coca_select    credit.kind=coca     train.timestep_selection=credit  train.timestep_fraction=F
                   (F = --select-fraction, default 0.5)
    windowed       flow models only (Flow-GRPO-Fast): credit.kind=sparse on a 2-step SDE window (sample.sde_window_size=2,
                   drawn per epoch), ODE steps elsewhere, train.skip_final_steps=0

    Flow models:   --config configs/flow_default.yaml --methods sparse windowed coca coca_select

Outputs in `--out` (default docs/credit_efficiency):
    runs.csv   one row per (method, seed, epoch), epoch 0 = before training: method, seed, epoch, reward_queries,
               eval_mean (empty at epochs without an evaluation), train_reward_mean (the epoch's mean training
               reward; empty at epoch 0), wall_s (cumulative training wall-clock, the sum of the trainer's
               perf/epoch_s; evaluation time is excluded)
    curve.png  seed-mean eval reward vs reward queries per method, shaded +-1 std over seeds
    table.md   final eval reward per method, reward queries (and training wall-clock) needed to reach sparse's
               final seed-mean eval reward, the sample-efficiency ratio vs sparse, wall-clock per run; then a
               secondary table of the mean training reward over the second half of the epochs (paired vs sparse)
    meta.json, config.yaml   the settings and the resolved config of the first run

The untrained model is the base model in every run (LoRA's up-projection starts at zero), and evaluation noise
comes from `eval.seed` only, so "eval before training" is computed once and reused (see eval_before_key).
Torch runs with `--threads` intra-op threads (default 1: on a shared CPU more threads oversubscribe the cores).

Sample efficiency: the seed-mean eval curve of a method is linearly interpolated between eval points; the first
query count at which it reaches sparse's final seed-mean eval value is "queries to reach"; the ratio is sparse's
total queries / that count ("not reached" if it never does). Per-seed ratios (each seed's curve against the same
target) are listed to show the spread.

Run directories (TensorBoard, metrics.jsonl, final LoRA) go to `--runs-dir` (default runs/credit_efficiency);
each finished run also leaves `bench.json` there, which `--reuse` picks up instead of training again.

Usage, from the repository root:

    .venv/bin/python benchmarks/credit_efficiency.py                                  # configs/default.yaml, 3 seeds
    .venv/bin/python benchmarks/credit_efficiency.py --epochs 20 --eval-every 4 --seeds 0 1 2
    .venv/bin/python benchmarks/credit_efficiency.py --config configs/tiny.yaml --methods sparse coca_select \\
        --seeds 0 --epochs 2 --eval-every 1 --set credit.window=2 --set "eval.prompts=[a red circle]"
    .venv/bin/python benchmarks/credit_efficiency.py --from-csv docs/credit_efficiency/runs.csv   # re-render only
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

CSV_COLUMNS = ["method", "seed", "epoch", "reward_queries", "eval_mean", "train_reward_mean", "wall_s"]
TOL = 1e-6  # eval means are float32 averages: values equal up to rounding count as reached
DDIM_METHODS = ["sparse", "sparse_random", "uniform", "coca", "coca_select"]
FLOW_METHODS = ["sparse", "windowed", "coca", "coca_select"]  # --config configs/flow_default.yaml
METHOD_ORDER = [*DDIM_METHODS, "windowed"]
COLOURS = {
    "sparse": (31, 119, 180),
    "sparse_random": (255, 127, 14),
    "uniform": (127, 127, 127),
    "coca": (214, 39, 40),
    "coca_select": (44, 160, 44),
    "windowed": (148, 103, 189),
}


def method_overrides(method: str, select_fraction: float = 0.5) -> list[str]:
    """The only settings that differ between methods (credit kind and step selection)."""
    table = {
        "sparse": ["credit.kind=sparse", "train.timestep_selection=all", "train.timestep_fraction=1.0"],
        "sparse_random": [
            "credit.kind=sparse", "train.timestep_selection=random", f"train.timestep_fraction={select_fraction}",
        ],
        "uniform": ["credit.kind=uniform", "train.timestep_selection=all", "train.timestep_fraction=1.0"],
        "coca": ["credit.kind=coca", "train.timestep_selection=all", "train.timestep_fraction=1.0"],
        "coca_select": [
            "credit.kind=coca", "train.timestep_selection=credit", f"train.timestep_fraction={select_fraction}",
        ],
        # flow models only: Flow-GRPO-Fast, sparse credit on a 2-step SDE window drawn per epoch, ODE elsewhere
        "windowed": [
            "credit.kind=sparse", "train.timestep_selection=all", "train.timestep_fraction=1.0",
            "sample.sde_window_size=2", "train.skip_final_steps=0",
        ],
    }
    if method not in table:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(table)}")
    return table[method]


def run_config(
    config: str | None, sets: list[str], method: str, seed: int, epochs: int, eval_every: int,
    runs_dir: Path, select_fraction: float = 0.5,
):
    """Base config + user --set overrides + the shared benchmark settings + the method's credit overrides."""
    from diffusion_rl.config import load_config

    shared = [
        f"seed={seed}",
        f"num_epochs={epochs}",
        f"output_dir={runs_dir / f'{method}_s{seed}'}",
        f"eval.every={eval_every}",
        "checkpoint.every=0",  # only the final checkpoint: no I/O inside the timed epochs
        "logging.image_every=0",
        # no best-of-run selection: the curve is of the weights each epoch ends with, and its last point is the
        # last epoch's weights, not the validation's pick among earlier ones
        "validation.prompts=[]",
    ]
    cfg = load_config(config, [*sets, *shared, *method_overrides(method, select_fraction)])
    if not cfg.eval.prompts:
        raise SystemExit(
            "the benchmark needs held-out eval prompts: set eval.prompts in the config or pass "
            "--set eval.prompts=world:eval (shapes world) or --set 'eval.prompts=[a prompt, another]'"
        )
    return cfg


def queries_per_epoch(cfg, world_size: int = 1) -> int:
    return cfg.sample.batch_size * cfg.sample.num_batches_per_epoch * world_size


def rows_from_history(method: str, seed: int, history: list[dict], eval_before: dict, eval_after: dict,
                      q: int, num_epochs: int) -> list[dict]:
    """CSV rows of one run: epoch 0 (eval before training) and one row per trained epoch; eval_mean is empty
    where that epoch had no evaluation; the last epoch carries the eval after training."""
    rows = [{
        "method": method, "seed": seed, "epoch": 0, "reward_queries": 0,
        "eval_mean": float(eval_before["mean"]), "train_reward_mean": "", "wall_s": 0.0,
    }]
    wall = 0.0
    for rec in history:
        wall += rec["perf/epoch_s"]
        epoch = rec["epoch"] + 1
        ev = eval_after["mean"] if epoch == num_epochs else rec.get("eval/mean")
        rows.append({
            "method": method, "seed": seed, "epoch": epoch, "reward_queries": epoch * q,
            "eval_mean": "" if ev is None else float(ev), "train_reward_mean": float(rec["reward/mean"]),
            "wall_s": round(wall, 3),
        })
    return rows


def run_one(cfg, method: str, seed: int, eval_before_cache: dict | None = None) -> list[dict]:
    """Train one run; return its CSV rows (epoch 0 = eval before training, then one row per epoch).
    `eval_before_cache` (eval_before_key -> result) is read and filled so equal settings evaluate the base once."""
    from diffusion_rl.trainer import train

    out = Path(cfg.output_dir)
    if (out / "metrics.jsonl").exists():  # a stale run directory would be appended to
        (out / "metrics.jsonl").unlink()
    t0 = time.perf_counter()
    cache = {} if eval_before_cache is None else eval_before_cache
    key = eval_before_key(cfg)
    result = train(cfg, eval_before=cache.get(key))
    cache.setdefault(key, result.eval_before)
    total_s = time.perf_counter() - t0
    rows = rows_from_history(method, seed, result.history, result.eval_before, result.eval_after,
                             queries_per_epoch(cfg), cfg.num_epochs)
    (out / "bench.json").write_text(json.dumps({"rows": rows, "total_s": total_s, "config_hash": cfg.hash()}))
    result.pipeline = None
    return rows


# ------------------------------------------------------------------------------------------------ analysis


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"], r["epoch"], r["reward_queries"] = int(r["seed"]), int(r["epoch"]), int(r["reward_queries"])
        r["wall_s"] = float(r["wall_s"])
        r["eval_mean"] = float(r["eval_mean"]) if r["eval_mean"] != "" else ""
        r["train_reward_mean"] = float(r["train_reward_mean"]) if r["train_reward_mean"] != "" else ""
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_COLUMNS})


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def curves(rows: list[dict]) -> dict[str, dict]:
    """Per method: queries (sorted), per-seed eval and wall arrays on those points, seed mean and std."""
    out: dict[str, dict] = {}
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    for m in methods:
        all_rows = [r for r in rows if r["method"] == m]
        mrows = [r for r in all_rows if r["eval_mean"] != ""]  # the eval points
        seeds = sorted({r["seed"] for r in mrows})
        qs = sorted({r["reward_queries"] for r in mrows})
        by = {(r["seed"], r["reward_queries"]): r for r in mrows}
        seeds = [s for s in seeds if all((s, q) in by for q in qs)]  # complete runs only
        ev = {s: [by[s, q]["eval_mean"] for q in qs] for s in seeds}
        wall = {s: [by[s, q]["wall_s"] for q in qs] for s in seeds}
        mean = [statistics.fmean(ev[s][i] for s in seeds) for i in range(len(qs))]
        std = [_std([ev[s][i] for s in seeds]) for i in range(len(qs))]
        wmean = [statistics.fmean(wall[s][i] for s in seeds) for i in range(len(qs))]
        # training reward per epoch (the same prompts and initial noise in every method for a given seed and epoch)
        train = {s: [r["train_reward_mean"] for r in sorted(all_rows, key=lambda r: r["epoch"])
                     if r["seed"] == s and r["train_reward_mean"] != ""] for s in seeds}
        out[m] = {"queries": qs, "seeds": seeds, "eval": ev, "wall": wall, "mean": mean, "std": std, "wall_mean": wmean,
                  "train": train}
    return out


def first_reach(xs: list[float], ys: list[float], target: float, extra: list[float] | None = None):
    """First x (linear interpolation) at which y reaches `target`; with `extra`, also that series interpolated at
    the same point. None if never reached."""
    for i, y in enumerate(ys):
        if y >= target - TOL:
            if i == 0:
                return (xs[0], extra[0] if extra else None)
            f = min(max((target - ys[i - 1]) / (y - ys[i - 1]), 0.0), 1.0)
            x = xs[i - 1] + f * (xs[i] - xs[i - 1])
            e = extra[i - 1] + f * (extra[i] - extra[i - 1]) if extra else None
            return (x, e)
    return None


def summarise(rows: list[dict], baseline: str = "sparse") -> dict:
    """Numbers of the Markdown table; `baseline` is the method whose final seed-mean eval sets the target."""
    cs = curves(rows)
    if baseline not in cs:
        baseline = next(iter(cs))
    b = cs[baseline]
    target = b["mean"][-1]
    total_q = b["queries"][-1]
    b_final = {s: b["eval"][s][-1] for s in b["seeds"]}
    start = statistics.fmean(b["eval"][s][0] for s in b["seeds"])
    summary = {"baseline": baseline, "target": target, "total_queries": total_q, "baseline_gain": target - start,
               "degenerate": target - start <= TOL, "methods": {}}
    for m, c in cs.items():
        finals = [c["eval"][s][-1] for s in c["seeds"]]
        hit = first_reach(c["queries"], c["mean"], target, c["wall_mean"])
        per_seed = {}
        for s in c["seeds"]:
            h = first_reach(c["queries"], c["eval"][s], target)
            per_seed[s] = (total_q / h[0]) if h and h[0] > 0 else (math.inf if h else None)
        paired = [c["eval"][s][-1] - b_final[s] for s in c["seeds"] if s in b_final]
        walls = [c["wall"][s][-1] for s in c["seeds"]]
        late = {s: statistics.fmean(c["train"][s][len(c["train"][s]) // 2:]) for s in c["seeds"] if c["train"][s]}
        b_late = {s: statistics.fmean(b["train"][s][len(b["train"][s]) // 2:]) for s in b["seeds"] if b["train"][s]}
        late_paired = [late[s] - b_late[s] for s in late if s in b_late]
        summary["methods"][m] = {
            "seeds": c["seeds"],
            "start_mean": statistics.fmean(c["eval"][s][0] for s in c["seeds"]),
            "final_mean": statistics.fmean(finals),
            "final_std": _std(finals),
            "gain_mean": statistics.fmean(c["eval"][s][-1] - c["eval"][s][0] for s in c["seeds"]),
            "delta_mean": statistics.fmean(paired) if paired else float("nan"),
            "delta_std": _std(paired),
            "queries_to_reach": hit[0] if hit else None,
            "wall_to_reach": hit[1] if hit else None,
            "ratio": (total_q / hit[0] if hit[0] > 0 else math.inf) if hit else None,
            "per_seed_ratio": per_seed,
            "wall_mean": statistics.fmean(walls),
            "wall_std": _std(walls),
            "train_late_mean": statistics.fmean(late.values()) if late else float("nan"),
            "train_late_std": _std(list(late.values())),
            "train_late_delta_mean": statistics.fmean(late_paired) if late_paired else float("nan"),
            "train_late_delta_std": _std(late_paired),
        }
    return summary


def _fmt_ratio(r) -> str:
    if r is None:
        return "not reached"
    return "reached at start" if math.isinf(r) else f"{r:.2f}x"


def table_markdown(rows: list[dict], meta: dict | None = None) -> str:
    s = summarise(rows)
    base = s["baseline"]
    lines = []
    if meta:
        lines.append(
            f"Budget per run: {s['total_queries']} reward queries ({meta.get('epochs')} epochs x "
            f"{meta.get('queries_per_epoch')} queries); eval every {meta.get('eval_every')} epoch(s) on "
            f"{meta.get('eval_prompts')}; seeds {meta.get('seeds')}; base config `{meta.get('config')}`"
            + (f" with `{' '.join(meta['sets'])}`" if meta.get("sets") else "") + "."
        )
        lines.append("")
    lines.append(
        f"Target: {base}'s final seed-mean eval reward = {s['target']:.4f}. Ratio = {s['total_queries']} / queries "
        f"to reach the target (seed-mean curve, linear interpolation). Wall = training wall-clock per run "
        f"(sum of perf/epoch_s, evaluation excluded)."
    )
    if s["degenerate"]:
        lines.append(
            f"**{base}'s final seed-mean eval reward is not above its start ({s['baseline_gain']:+.4f}): every method "
            "'reaches' it at query 0, so queries-to-reach and the ratio are undefined here; compare the final "
            "rewards and the gains instead.**"
        )
    lines.append("")
    lines.append(
        f"| method | seeds | eval at start | final eval (mean ± std) | gain over start | final − {base} (paired, mean ± std) | "
        f"queries to reach {base} final | ratio vs {base} | per-seed ratios | wall to reach (s) | "
        "wall per run (s, mean ± std) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, d in s["methods"].items():
        q, wr = d["queries_to_reach"], d["wall_to_reach"]
        per_seed = ", ".join(_fmt_ratio(d["per_seed_ratio"][k]) for k in d["seeds"])
        lines.append(
            f"| {m} | {len(d['seeds'])} | {d['start_mean']:.4f} | {d['final_mean']:.4f} ± {d['final_std']:.4f} | "
            f"{d['gain_mean']:+.4f} | "
            f"{d['delta_mean']:+.4f} ± {d['delta_std']:.4f} | {'not reached' if q is None else f'{q:.0f}'} | "
            f"{'n/a' if s['degenerate'] else _fmt_ratio(d['ratio'])} | {'n/a' if s['degenerate'] else per_seed} | "
            f"{'—' if wr is None else f'{wr:.0f}'} | "
            f"{d['wall_mean']:.0f} ± {d['wall_std']:.0f} |"
        )
    lines += [
        "",
        f"Secondary: mean training reward over the second half of the epochs (on-policy samples; for a given seed "
        f"and epoch every method draws the same prompts), per seed, then mean ± std over seeds; paired difference "
        f"to {base} per seed.",
        "",
        f"| method | train reward, late epochs (mean ± std) | − {base} (paired, mean ± std) |",
        "|---|---|---|",
    ]
    for m, d in s["methods"].items():
        lines.append(f"| {m} | {d['train_late_mean']:.4f} ± {d['train_late_std']:.4f} | "
                     f"{d['train_late_delta_mean']:+.4f} ± {d['train_late_delta_std']:.4f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plot (PIL)


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) inside [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_labels(ticks: list[float]) -> list[str]:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else abs(ticks[0]) or 1.0
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{v:.{digits}f}" for v in ticks]


def plot_png(rows: list[dict], path: Path, title: str = "Eval reward vs reward queries") -> None:
    """A line plot drawn with PIL: seed mean per method, shaded +-1 std over seeds, axes, ticks, legend."""
    from PIL import Image, ImageDraw, ImageFont

    cs = curves(rows)
    W, H = 1000, 620
    L, R, Tm, B = 90, 220, 50, 70  # margins
    img = Image.new("RGBA", (W, H), (255, 255, 255, 255))
    d = ImageDraw.Draw(img)
    try:
        font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    xmax = max(max(c["queries"]) for c in cs.values()) or 1
    lo = min(min(m - s for m, s in zip(c["mean"], c["std"], strict=True)) for c in cs.values())
    hi = max(max(m + s for m, s in zip(c["mean"], c["std"], strict=True)) for c in cs.values())
    pad = (hi - lo) * 0.08 or 0.01
    lo, hi = lo - pad, hi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return L + (W - L - R) * x / xmax, Tm + (H - Tm - B) * (1 - (y - lo) / (hi - lo))

    # grid and ticks
    yt = nice_ticks(lo, hi, 8)
    for yv, label in zip(yt, _tick_labels(yt), strict=True):
        _, yp = px(0, yv)
        d.line([(L, yp), (W - R, yp)], fill=(230, 230, 230), width=1)
        d.text((L - 8, yp), label, fill="black", font=small, anchor="rm")
    xt = nice_ticks(0, xmax)
    for xv, label in zip(xt, _tick_labels(xt), strict=True):
        xp, _ = px(xv, lo)
        d.line([(xp, Tm), (xp, H - B)], fill=(230, 230, 230), width=1)
        d.text((xp, H - B + 8), label, fill="black", font=small, anchor="mt")
    d.rectangle([(L, Tm), (W - R, H - B)], outline="black", width=1)
    d.text(((L + W - R) / 2, H - 22), "reward queries (sampled training images)", fill="black", font=font, anchor="mm")
    d.text(((L + W - R) / 2, 22), title, fill="black", font=font, anchor="mm")
    ylab = Image.new("RGBA", (300, 24), (255, 255, 255, 0))
    ImageDraw.Draw(ylab).text((150, 12), "eval reward (mean ± std over seeds)", fill="black", font=font, anchor="mm")
    ylab = ylab.rotate(90, expand=True)
    img.alpha_composite(ylab, (8, int((Tm + H - B) / 2 - ylab.height / 2)))

    # the target: the baseline's final seed-mean eval reward (dashed)
    target = summarise(rows)["target"] if "sparse" in cs else None
    if target is not None:
        _, yt_px = px(0, target)
        x = float(L)
        while x < W - R:
            d.line([(x, yt_px), (min(x + 8, W - R), yt_px)], fill=(60, 60, 60), width=1)
            x += 14
    # shaded spread, then lines
    for m, c in cs.items():
        col = COLOURS.get(m, (148, 103, 189))
        if len(c["seeds"]) > 1:
            top = [px(q, mu + sd) for q, mu, sd in zip(c["queries"], c["mean"], c["std"], strict=True)]
            bot = [px(q, mu - sd) for q, mu, sd in zip(c["queries"], c["mean"], c["std"], strict=True)]
            band = Image.new("RGBA", (W, H), (0, 0, 0, 0))
            ImageDraw.Draw(band).polygon(top + bot[::-1], fill=(*col, 45))
            img.alpha_composite(band)
    d = ImageDraw.Draw(img)
    for m, c in cs.items():
        col = COLOURS.get(m, (148, 103, 189))
        pts = [px(q, mu) for q, mu in zip(c["queries"], c["mean"], strict=True)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=3, joint="curve")
        for x, y in pts:
            d.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=col)
    # legend
    y0 = Tm + 10
    for i, (m, c) in enumerate(cs.items()):
        col = COLOURS.get(m, (148, 103, 189))
        y = y0 + 28 * i
        d.line([(W - R + 15, y), (W - R + 45, y)], fill=col, width=3)
        d.text((W - R + 52, y), f"{m} (n={len(c['seeds'])})", fill="black", font=small, anchor="lm")
    if target is not None:
        y = y0 + 28 * len(cs)
        for x in (W - R + 15, W - R + 33):
            d.line([(x, y), (x + 8, y)], fill=(60, 60, 60), width=1)
        d.text((W - R + 52, y), "sparse final", fill="black", font=small, anchor="lm")
    img.convert("RGB").save(path)


# ------------------------------------------------------------------------------------------------ driver


def write_outputs(rows: list[dict], out: Path, meta: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "runs.csv")
    plot_png(rows, out / "curve.png")
    (out / "table.md").write_text(table_markdown(rows, meta))
    if meta is not None:
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return summarise(rows)


def run_benchmark(
    config: str | None, methods: list[str], seeds: list[int], epochs: int, eval_every: int, out: Path,
    runs_dir: Path, sets: list[str] = (), select_fraction: float = 0.5, reuse: bool = False,
    threads: int | None = None,
) -> list[dict]:
    """All (method, seed) runs, sequentially; the method order rotates per seed so machine-load drifts spread out.
    Writes the outputs after every run (a partial benchmark still leaves a CSV, plot and table). `threads` sets
    torch's intra-op threads for the duration (restored afterwards); None keeps the current setting."""
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_all(config, methods, seeds, epochs, eval_every, out, runs_dir, list(sets), select_fraction, reuse)
    finally:
        torch.set_num_threads(previous_threads)


def eval_before_key(cfg) -> str:
    """What the untrained model's fixed-seed eval depends on: the model, the eval and the sampling settings.

    Before training every run's model IS the base model (LoRA's up-projection starts at zero; a full fine-tune
    starts from the base weights), and evaluation noise comes only from `eval.seed`, so runs that share this key
    share their "eval before training" (the unit test checks the premise); it is computed once and passed to
    `train(eval_before=...)`."""
    s = cfg.sample
    return json.dumps([cfg.model.model_dump(mode="json"), cfg.eval.model_dump(mode="json", exclude={"every"}),
                       s.num_steps, s.guidance_scale, s.eta, s.batch_size, s.negative_prompt, cfg.reward.model_dump(mode="json")],
                      sort_keys=True)


def _run_all(config, methods, seeds, epochs, eval_every, out, runs_dir, sets, select_fraction, reuse) -> list[dict]:
    import torch

    cfgs = {(m, s): run_config(config, sets, m, s, epochs, eval_every, runs_dir, select_fraction)
            for s in seeds for m in methods}  # validate everything before the first run
    any_cfg = next(iter(cfgs.values()))
    meta = {
        "config": config or "(built-in defaults)", "sets": sets, "methods": methods, "seeds": seeds, "epochs": epochs,
        "eval_every": eval_every, "queries_per_epoch": queries_per_epoch(any_cfg), "select_fraction": select_fraction,
        "eval_prompts": any_cfg.eval.prompts if isinstance(any_cfg.eval.prompts, str) else f"{len(any_cfg.eval.prompts)} prompts",
        "model": any_cfg.model.pretrained, "reward": any_cfg.reward.name, "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    out.mkdir(parents=True, exist_ok=True)
    from diffusion_rl.config import dump_config

    (out / "config.yaml").write_text(  # the resolved config of the first run, for the record
        f"# resolved config of {methods[0]} seed {seeds[0]}; other runs differ only in seed, output_dir and the\n"
        f"# method overrides: {', '.join(f'{m}: {chr(32).join(method_overrides(m, select_fraction))}' for m in methods)}\n"
        + dump_config(cfgs[methods[0], seeds[0]])
    )
    rows: list[dict] = []
    eval_before_cache: dict[str, dict] = {}
    for i, s in enumerate(seeds):
        rows += _run_seed(i, s, methods, cfgs, reuse, select_fraction, rows, out, meta, eval_before_cache)
    return rows


def _run_seed(i, s, methods, cfgs, reuse, select_fraction, done, out, meta, eval_before_cache) -> list[dict]:
    """One seed's runs; the method order rotates with the seed index so load drifts hit all methods alike."""
    rows: list[dict] = []
    for m in methods[i % len(methods):] + methods[: i % len(methods)]:
        cfg = cfgs[m, s]
        cached = Path(cfg.output_dir) / "bench.json"
        if reuse and cached.exists() and json.loads(cached.read_text()).get("config_hash") == cfg.hash():
            run_rows = json.loads(cached.read_text())["rows"]
            print(f"[bench] {m} seed {s}: reused {cached}", flush=True)
        else:
            t0 = time.perf_counter()
            print(f"[bench] {m} seed {s}: {' '.join(method_overrides(m, select_fraction))}", flush=True)
            run_rows = run_one(cfg, m, s, eval_before_cache)
            print(f"[bench] {m} seed {s}: done in {time.perf_counter() - t0:.0f} s, final eval "
                  f"{run_rows[-1]['eval_mean']:.4f}, train wall {run_rows[-1]['wall_s']:.0f} s", flush=True)
        rows += run_rows
        write_outputs(done + rows, out, meta)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="base YAML config (default configs/default.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the config's num_epochs)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every K epochs (plus before and after)")
    p.add_argument("--methods", nargs="+", default=DDIM_METHODS, choices=METHOD_ORDER,
                   help=f"default {' '.join(DDIM_METHODS)}; for a flow model: {' '.join(FLOW_METHODS)}")
    p.add_argument("--select-fraction", type=float, default=0.5, help="train.timestep_fraction of coca_select and sparse_random")
    p.add_argument("--out", default="docs/credit_efficiency", help="where runs.csv, curve.png, table.md go")
    p.add_argument("--runs-dir", default="runs/credit_efficiency", help="run directories (TensorBoard, weights)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run (repeatable), e.g. --set credit.window=2")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared CPU, 2+ threads oversubscribe and slow down)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs (bench.json with the same config hash)")
    p.add_argument("--from-csv", default=None, help="only re-render curve.png and table.md from this runs.csv")
    a = p.parse_args(argv)

    out = Path(a.out)
    if a.from_csv:
        rows = read_csv(Path(a.from_csv))
        meta_path = Path(a.from_csv).parent / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        out.mkdir(parents=True, exist_ok=True)
        plot_png(rows, out / "curve.png")
        (out / "table.md").write_text(table_markdown(rows, meta))
        print((out / "table.md").read_text())
        return 0
    if "sparse" not in a.methods:
        print("[bench] note: sparse is not among the methods; the first method sets the target instead")
    epochs = a.epochs
    if epochs is None:
        from diffusion_rl.config import load_config

        epochs = load_config(a.config, a.sets).num_epochs
    rows = run_benchmark(a.config, a.methods, a.seeds, epochs, a.eval_every, out, Path(a.runs_dir), a.sets,
                         a.select_fraction, a.reuse, a.threads)
    print((out / "table.md").read_text())
    print(f"[bench] wrote {out / 'runs.csv'}, {out / 'curve.png'}, {out / 'table.md'} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
