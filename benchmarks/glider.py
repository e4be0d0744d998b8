"""GLIDER vs BC-only vs a flat policy on the embedded `rooms` environment, seen and unseen tasks, plus online
adaptation to a changed house (`rooms-rewired`: other doors), over several seeds; and a ScienceWorld smoke run.

Per seed, everything through `drl reason train` / `reason.agents.trainer.train` with configs/glider_text.yaml:

    glider   BC of both levels (bc.steps) -> offline RL (offline_rl.steps, awac)         [checkpoint after BC]
    bc       the same BC checkpoint, resumed with offline_rl.weighting=none: the same number of further steps of
             plain BC (same compute, no critic)
    flat     one prompt role (task + observation -> action), BC -> offline RL (awac at the action level), the same
             backbone, data and step counts
    adapt    each of the three resumed from its final checkpoint for `online.rounds` rounds in rooms-rewired (play 22
             episodes with epsilon 0.2, then updates on all data); success in rooms-rewired before and after

The backbone (domain-pretrained on random-policy text) and the offline episodes of a seed are built once and copied
into each method's run directory (the trainer reloads them), so the methods differ only in what the issue compares.

    OMP_NUM_THREADS=1 python benchmarks/glider.py --seeds 0 1 2            # ~20-30 CPU minutes at one thread
    OMP_NUM_THREADS=1 python benchmarks/glider.py --scienceworld-only      # the ScienceWorld smoke run
    # or the seeds as parallel processes, then merged:
    for s in 0 1 2; do python benchmarks/glider.py --seeds $s --skip-scienceworld \
        --out benchmarks/results/glider_seed$s.json & done; wait
    python benchmarks/glider.py --merge benchmarks/results/glider_seed*.json
Results: benchmarks/results/glider.json (rooms) and benchmarks/results/glider_scienceworld.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "glider_text.yaml"
RESULTS = REPO / "benchmarks" / "results"


def _train(overrides: list[str], resume: str | None = None) -> dict:
    from reasoning_rl.agents.config import load_config
    from reasoning_rl.agents.trainer import train

    cfg = load_config(CONFIG, overrides)
    result = train(cfg, resume=resume)
    return {"final": result.eval_final, "offline": result.eval_offline,
            "online_success": [r["reason/online_success"] for r in result.history if "reason/online_success" in r]}


def _copy_run(src: Path, dst: Path, keep_checkpoint: str | None = None) -> None:
    """A new run directory holding src's backbone, data and (optionally) one of its checkpoints."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in ("backbone", "data"):
        shutil.copytree(src / name, dst / name)
    if keep_checkpoint:
        shutil.copytree(src / "checkpoints" / keep_checkpoint, dst / "checkpoints" / keep_checkpoint)


def _last_checkpoint(run: Path) -> str:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".tmp"))[-1]


def run_seed(seed: int, work: Path, args) -> dict:
    common = [f"seed={seed}", f"bc.steps={args.bc_steps}", f"offline_rl.steps={args.rl_steps}",
              f"eval.episodes={args.eval_episodes}", "checkpoint.keep_last=3", "logging.log_every=100"]
    out: dict = {}
    t0 = time.perf_counter()
    g = work / f"seed{seed}" / "glider"
    out["glider"] = _train(common + [f"output_dir={g}", f"checkpoint.every={args.bc_steps}"])
    b = work / f"seed{seed}" / "bc"
    _copy_run(g, b, f"checkpoint-{args.bc_steps:06d}")
    out["bc"] = _train(common + [f"output_dir={b}", "offline_rl.weighting=none", f"checkpoint.every={args.bc_steps}"],
                       resume="auto")
    f = work / f"seed{seed}" / "flat"
    _copy_run(g, f)
    out["flat"] = _train(common + [f"output_dir={f}", "agent.hierarchical=false", f"checkpoint.every={args.bc_steps}"])
    out["offline_minutes"] = (time.perf_counter() - t0) / 60
    adapt = [f"online.rounds={args.online_rounds}", "online.env=rooms-rewired",
             f"online.updates_per_round={args.online_updates}", "online.episodes_per_round=22"]
    for method, run, extra in (("glider", g, []), ("bc", b, ["offline_rl.weighting=none"]),
                               ("flat", f, ["agent.hierarchical=false"])):
        a = work / f"seed{seed}" / f"{method}_adapt"
        _copy_run(run, a, _last_checkpoint(run))
        out[f"{method}_adapt"] = _train(common + extra + adapt + [f"output_dir={a}", "checkpoint.every=0"],
                                        resume="auto")
    out["minutes"] = (time.perf_counter() - t0) / 60
    return out


def long_offline_rl(seed: int, work: Path, args) -> dict:
    """The GLIDER run's BC checkpoint resumed with `--long-rl-steps` offline-RL steps (critic warm-up a third of
    them): does a longer-trained critic change the picture? Also how the critic ranks the expert's sub-task against
    the medium policy's decoy at the decision that tells them apart (all seen tasks)."""
    g = work / f"seed{seed}" / "glider"
    out_dir = work / f"seed{seed}" / ("glider_long" if args.long_weighting == "awac" else f"{args.long_weighting}_long")
    _copy_run(g, out_dir, f"checkpoint-{args.bc_steps:06d}")
    steps = args.long_rl_steps
    res = _train([f"seed={seed}", f"bc.steps={args.bc_steps}", f"offline_rl.steps={steps}",
                  f"offline_rl.critic_warmup={steps // 3}", f"eval.episodes={args.eval_episodes}",
                  f"output_dir={out_dir}", "checkpoint.every=0", "logging.log_every=100",
                  f"offline_rl.weighting={args.long_weighting}"], resume="auto")
    if args.long_weighting == "none":  # the BC control of the same length: no critic to probe
        return {"final": res["final"], "weighting": "none"}
    return {"final": res["final"], "weighting": args.long_weighting,
            "critic_probe": {"glider": critic_probe(g), "glider_long": critic_probe(out_dir)}}


def critic_probe(run: Path) -> dict:
    """At 'holding the object in its home room' of every seen task: Q and log pi of the expert's next sub-task vs the
    medium policy's decoy `go to <wrong room>` (the data's returns after them: ~0.92 vs ~0.25)."""
    from safetensors.torch import load_file

    from reasoning_rl.agents import glider, rooms
    from reasoning_rl.agents.evaluation import load_agent

    model, tok, cfg = load_agent(run)
    heads = glider.CriticHeads(model.config.hidden_size, cfg.model.critic_width)
    heads.load_state_dict(load_file(str(run / "final" / "critic.safetensors")))
    env, prompts, actions = rooms.RoomsEnv(), [], []
    for task in env.tasks("seen"):
        env.reset(task, 0)
        while env.held != env.obj:
            env.step(env.expert_action(f"get {env.obj}"))
        obs = env.observation()
        prompts += [glider.high_prompt(obs.task, obs.text)] * 2
        actions += [env.expert_subgoal(), f"go to {env.decoy_room()}"]
    enc = glider.encode(tok, prompts, actions, cfg.model.max_length)
    with torch.no_grad():
        logp, h_act, h_state = glider.forward(model, enc)
        q, _ = heads(h_act, h_state)
    return {"q_expert": q[0::2].mean().item(), "q_decoy": q[1::2].mean().item(),
            "critic_ranks_expert_first": (q[0::2] > q[1::2]).float().mean().item(),
            "policy_prefers_expert": (logp[0::2] > logp[1::2]).float().mean().item()}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(per_seed: dict) -> dict:
    table: dict = {}
    seeds = list(per_seed.values())
    for method in ("glider", "bc", "flat"):
        row = {}
        for split in ("seen", "unseen"):
            row[f"{split}_success"] = _stats([s[method]["final"][split]["success"] for s in seeds])
            row[f"{split}_invalid_rate"] = _stats([s[method]["final"][split]["invalid_rate"] for s in seeds])
        adapt = [s[f"{method}_adapt"] for s in seeds]
        row["rewired_before_seen"] = _stats([a["offline"]["seen"]["success"] for a in adapt])
        row["rewired_after_seen"] = _stats([a["final"]["seen"]["success"] for a in adapt])
        row["rewired_before_unseen"] = _stats([a["offline"]["unseen"]["success"] for a in adapt])
        row["rewired_after_unseen"] = _stats([a["final"]["unseen"]["success"] for a in adapt])
        row["online_success_per_round"] = [statistics.mean(r) for r in zip(*[a["online_success"] for a in adapt],
                                                                           strict=True)]
        table[method] = row
    return table


def scienceworld_smoke(work: Path) -> dict:
    from reasoning_rl.agents.scienceworld_env import available

    reason = available()
    if reason:
        return {"skipped": reason}
    t0 = time.perf_counter()
    out = work / "scienceworld"
    shutil.rmtree(out, ignore_errors=True)
    res = _train([f"output_dir={out}", "env.name=scienceworld", "env.scienceworld_tasks=[find-living-thing]",
                  "env.max_steps=40", "data.episodes=8", "data.subtask_steps=4", "model.pretrain_steps=40",
                  "bc.steps=150", "offline_rl.steps=60", "offline_rl.critic_warmup=20", "eval.episodes=2",
                  "checkpoint.every=0", "logging.log_every=50"])
    gold = [json.loads(x) for x in (out / "data" / "offline.jsonl").read_text().splitlines()]
    return {"task": "find-living-thing", "simplifications": "easy", "gold_episodes": len(gold),
            "gold_success": sum(e["success"] for e in gold) / len(gold),
            "gold_mean_steps": statistics.mean(e["steps"] for e in gold),
            "final": res["final"], "minutes": (time.perf_counter() - t0) / 60}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bc-steps", type=int, default=300)
    p.add_argument("--rl-steps", type=int, default=300)
    p.add_argument("--online-rounds", type=int, default=3)
    p.add_argument("--online-updates", type=int, default=30)
    p.add_argument("--eval-episodes", type=int, default=22)
    p.add_argument("--work", type=Path, default=Path("runs/bench_glider"))
    p.add_argument("--scienceworld-only", action="store_true")
    p.add_argument("--long-rl-steps", type=int, default=0,
                   help="instead: resume each seed's GLIDER BC checkpoint (of an earlier run) with this many "
                   "offline-RL steps; writes --out")
    p.add_argument("--long-weighting", default="awac", choices=["awac", "q_weighted", "none"],
                   help="--long-rl-steps: the weighting (none = the BC control of the same length)")
    p.add_argument("--skip-scienceworld", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "glider.json", help="where the rooms results go")
    p.add_argument("--merge", type=Path, nargs="+", help="merge per-seed result files (seeds run in parallel) "
                   "into --out instead of training")
    args = p.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        per_seed = {k: v for part in parts for k, v in part["per_seed"].items()}
        result = {**parts[0], "table": aggregate(per_seed), "per_seed": per_seed,
                  "minutes": sum(p["minutes"] for p in parts), "merged_from": [str(f) for f in args.merge]}
        result["args"]["seeds"] = str(sorted(int(k) for k in per_seed))
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["table"], indent=1))
        return
    if args.long_rl_steps:
        res = {str(seed): long_offline_rl(seed, args.work, args) for seed in args.seeds}
        args.out.write_text(json.dumps({"long_rl_steps": args.long_rl_steps, "per_seed": res}, indent=1))
        print(json.dumps(res, indent=1))
        return
    if not args.scienceworld_only:
        t0 = time.perf_counter()
        per_seed = {}
        for seed in args.seeds:
            per_seed[str(seed)] = run_seed(seed, args.work, args)
            print(f"[bench glider] seed {seed} done in {per_seed[str(seed)]['minutes']:.1f} min", flush=True)
        result = {"config": str(CONFIG.relative_to(REPO)), "args": {k: str(v) for k, v in vars(args).items()},
                  "table": aggregate(per_seed), "per_seed": per_seed,
                  "minutes": (time.perf_counter() - t0) / 60, "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["table"], indent=1))
    if not args.skip_scienceworld:
        sw = scienceworld_smoke(args.work)
        (RESULTS / "glider_scienceworld.json").write_text(json.dumps(sw, indent=1))
        print(json.dumps(sw, indent=1))


if __name__ == "__main__":
    main()
