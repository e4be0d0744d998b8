#!/usr/bin/env python
"""drl vs TRL 0.23.1 `DDPOTrainer` vs bare UNet compute, on the same tiny-pipeline DDPO workload.

Workload (identical on all three sides): the tiny random SD pipeline of `diffusion_rl.models.build_tiny_pipeline(0)`
(UNet ~0.8 M params, latent 4x8x8, 16x16 images, CLIP text encoder hidden 32), saved once with
`save_pretrained` and loaded from that directory by both trainers; LoRA r=4 / alpha=4 on to_q/to_k/to_v/to_out.0,
10 DDIM steps (eta 1), classifier-free guidance 5.0, 16 samples/epoch = 2 sampling batches of 8
(4 prompts x 4 images), train batch 4, gradient accumulation 1 (one optimizer step per train batch, over all
10 timesteps), 1 inner epoch, fp32 ("no" mixed precision), per-prompt stat tracking (buffer 32, min count 16),
JPEG-compressibility reward (`rewards.load("jpeg_compressibility")`, the same function for both trainers).

What is timed (median over epochs 2..N of every round; epoch 1 is warm-up and dropped):
  drl   one full iteration of drl's epoch loop, from the start of the epoch (sampling) to the end of its
        logging (TensorBoard scalars, metrics.jsonl, credit profile), measured by two timestamps taken in
        this benchmark process; drl's own `perf/epoch_s` (which stops before logging) is kept in the JSON too.
        Reward scoring overlaps sampling (drl's default, reward.overlap=true).
  TRL   one `DDPOTrainer.step(epoch, global_step)` call (sampling, rewards, advantages, training, its
        logging, its checkpoint test). async_reward_computation=False (TRL's default; its async mode only
        parallelises scoring *after* all sampling, it does not overlap sampling).
  bare  the UNet work of one epoch and nothing else: 2 x 10 no-grad forwards at batch 16 (the CFG-doubled
        sampling batch of 8), then 4 train batches x 10 timesteps of forward+backward at batch 8 (CFG-doubled
        train batch of 4) through the LoRA UNet, the CFG combination, a scalar loss, and one AdamW step per train
        batch. No text encoder, VAE, scheduler, log-probs, rewards, shuffles or logging.

Every side runs in its own subprocess with the same `torch.set_num_threads(--threads)` and OMP/MKL thread
variables. The three processes run in lock-step (see `Gate`): one computes at a time and they take turns epoch by
epoch, the order rotating every epoch, so machine noise hits neighbouring epochs of all sides alike. Reported:
median wall and median process-CPU seconds per epoch, ratios of the medians, and paired-epoch ratios.

The TRL environment (TRL is NOT installed into the main venv; it is installed `--no-deps` into a separate
venv whose only own package is trl, and which sees the main venv's packages through a .pth file):

    python -m venv benchmarks/.venv-trl                       # run with the main venv's python (.venv/bin/python)
    echo "import site; site.addsitedir('<main venv site-packages>')" \\
        > benchmarks/.venv-trl/lib/python3.11/site-packages/_drl_main_venv.pth
    benchmarks/.venv-trl/bin/python -m pip install --no-deps trl==0.23.1
    echo '*' > benchmarks/.venv-trl/.gitignore               # keep the env out of git

`--setup` does exactly that. Usage, from the repository root:

    .venv/bin/python benchmarks/trl_comparison.py --setup                 # once (needs PyPI)
    .venv/bin/python benchmarks/trl_comparison.py                         # defaults: --epochs 4 --rounds 2 --threads 1
    .venv/bin/python benchmarks/trl_comparison.py --epochs 5 --rounds 3 --threads 2 --json out.json
    .venv/bin/python benchmarks/trl_comparison.py --profile               # cProfile of one drl epoch (epoch 2)

Compatibility shims for TRL 0.23.1 on diffusers 0.42 / transformers 5 / accelerate 1.15 / peft 0.21, applied
in the TRL worker process only (no installed file is edited):
  * `accelerate.PartialState()` is created before `DefaultDDPOStableDiffusionPipeline(...)`: with no LoRA file
    in the model directory TRL logs a warning through `accelerate.logging`, which in accelerate >= 1.x raises
    "You must initialize the accelerate state ... before using the logging utility" when no state exists yet.
  Nothing else was needed: `from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline` imports
  and trains as is.

Targets (from the issue): drl epoch <= 0.8 x TRL epoch, and drl epoch <= 1.15 x bare UNet compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ENV = HERE / ".venv-trl"
TRL_VERSION = "0.23.1"

# The workload, shared by all three sides.
NUM_STEPS = 10
SAMPLE_BATCH = 8
NUM_BATCHES = 2
TRAIN_BATCH = 4
IMAGES_PER_PROMPT = 4
GUIDANCE = 5.0
ETA = 1.0
LORA_RANK, LORA_ALPHA = 4, 4.0
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red apple", "a blue car"]  # drl's default prompt list
TARGET_VS_TRL = 0.8
TARGET_VS_BARE = 1.15


# ------------------------------------------------------------------------------------------------
# environment setup
# ------------------------------------------------------------------------------------------------


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def setup_env(env: Path) -> None:
    """Create the TRL venv next to (not inside) the main one; only trl itself is installed into it."""
    main_site = sysconfig.get_paths()["purelib"]
    try:
        import diffusion_rl  # noqa: F401
    except ImportError:
        sys.exit("run --setup with the main venv's python (the one that has drl installed)")
    if not env_python(env).exists():
        print(f"[setup] python -m venv {env}")
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    site = subprocess.run(
        [str(env_python(env)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    pth = Path(site) / "_drl_main_venv.pth"
    # `import` lines in a .pth are executed: addsitedir also processes the main venv's own .pth files
    # (the editable drl install), which a plain path line would not.
    pth.write_text(f"import site; site.addsitedir({main_site!r})\n")
    print(f"[setup] {pth} -> {main_site}")
    (env / ".gitignore").write_text("*\n")
    cmd = [str(env_python(env)), "-m", "pip", "install", "--no-deps", f"trl=={TRL_VERSION}"]
    print("[setup] " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    check = subprocess.run(
        [str(env_python(env)), "-c", "import trl, torch, diffusers, diffusion_rl; print(trl.__version__, trl.__file__)"],
        check=True, capture_output=True, text=True,
    )
    print(f"[setup] ok: trl {check.stdout.strip()}")


# ------------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ------------------------------------------------------------------------------------------------


class Gate:
    """Lock-step with the driver: before each epoch the worker says `ready` and waits for `go`; after it, `done`.
    Only one side computes at a time, and the sides take turns epoch by epoch, so a burst of load from other
    users hits neighbouring epochs of all sides alike. Without control pipes (a standalone worker) it is a no-op."""

    def __init__(self, rfd: int | None, wfd: int | None):
        self.r = os.fdopen(rfd, "r") if rfd is not None else None
        self.w = os.fdopen(wfd, "w") if wfd is not None else None

    def wait(self) -> None:
        if self.w:
            self.w.write("ready\n")
            self.w.flush()
            if self.r.readline().strip() != "go":
                sys.exit("driver went away")

    def done(self) -> None:
        if self.w:
            self.w.write("done\n")
            self.w.flush()


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def worker_drl(model_dir: str, epochs: int, out_dir: str, gate: Gate, profile: str | None = None) -> dict:
    """drl's Python API, timed through its public seam: a TrainerCallback timestamps each epoch's start (after
    the gate lets it go, before drl's own epoch clock starts) and its end (once the epoch's record is logged)."""
    from diffusion_rl.config import load_config
    from diffusion_rl.core.run import TrainerCallback
    from diffusion_rl.trainer import train

    starts, ends, cpu_starts, cpu_ends = [], [], [], []
    prof = {"p": None}

    class EpochTimer(TrainerCallback):
        def on_epoch_start(self, epoch):
            gate.wait()
            starts.append(time.perf_counter())
            cpu_starts.append(time.process_time())
            if profile and epoch == 1:
                import cProfile

                prof["p"] = cProfile.Profile()
                prof["p"].enable()

        def on_epoch_end(self, epoch, record):
            if prof["p"] is not None and epoch == 1:
                prof["p"].disable()
                prof["p"].dump_stats(profile)
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            gate.done()

    cfg = load_config(
        None,
        [
            f"model.pretrained={model_dir}",
            f"sample.num_steps={NUM_STEPS}",
            f"sample.batch_size={SAMPLE_BATCH}",
            f"sample.num_batches_per_epoch={NUM_BATCHES}",
            f"sample.images_per_prompt={IMAGES_PER_PROMPT}",
            f"sample.guidance_scale={GUIDANCE}",
            f"sample.eta={ETA}",
            f"train.batch_size={TRAIN_BATCH}",
            "train.gradient_accumulation_steps=1",
            f"model.lora_rank={LORA_RANK}",
            f"model.lora_alpha={LORA_ALPHA}",
            "advantage.per_prompt_stat_tracking=true",
            "advantage.buffer_size=32",
            "advantage.min_count=16",
            "reward.name=jpeg_compressibility",
            f"num_epochs={epochs}",
            f"output_dir={out_dir}",
            "checkpoint.every=0",
            "logging.image_every=0",
        ],
    )
    result = train(cfg, callbacks=[EpochTimer()])
    return {
        "epoch_s": [e - s for s, e in zip(starts, ends, strict=True)],
        "epoch_cpu_s": [e - s for s, e in zip(cpu_starts, cpu_ends, strict=True)],
        "trainer_epoch_s": [h["perf/epoch_s"] for h in result.history],  # the gate wait is outside drl's clock
        "sample_s": [h["perf/sample_s"] for h in result.history],
        "train_s": [h["perf/train_s"] for h in result.history],
    }


def worker_trl(model_dir: str, epochs: int, out_dir: str, gate: Gate) -> dict:
    import itertools

    import accelerate
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    import rewards

    # Shim: see the module docstring (accelerate.logging needs an initialised state before TRL's warning).
    accelerate.PartialState()
    pipe = DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=True)
    config = DDPOConfig(
        num_epochs=epochs,
        seed=42,
        sample_num_steps=NUM_STEPS,
        sample_eta=ETA,
        sample_guidance_scale=GUIDANCE,
        sample_batch_size=SAMPLE_BATCH,
        sample_num_batches_per_epoch=NUM_BATCHES,
        train_batch_size=TRAIN_BATCH,
        train_gradient_accumulation_steps=1,
        train_num_inner_epochs=1,
        train_cfg=True,
        mixed_precision="no",
        per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=32,
        per_prompt_stat_tracking_min_count=16,
        async_reward_computation=False,
        save_freq=10**9,  # no checkpoints inside the timed epochs (drl runs with checkpoint.every=0)
        log_with=None,
        project_kwargs={"project_dir": out_dir},
    )
    jpeg = rewards.load("jpeg_compressibility")

    def reward_fn(images, prompts, prompt_metadata):  # TRL passes tuples; images are [B, 3, H, W] in [0, 1]
        return jpeg(images, list(prompts), list(prompt_metadata))

    # K consecutive samples per prompt, like drl's batches (2 prompts x 4 images per sampling batch).
    cycle = itertools.cycle([p for p in PROMPTS for _ in range(IMAGES_PER_PROMPT)])

    def prompt_fn():
        return next(cycle), {}

    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipe)
    times, cpu = [], []
    step = trainer.step

    def timed_step(epoch, global_step):
        gate.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        r = step(epoch, global_step)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        gate.done()
        return r

    trainer.step = timed_step
    trainer.train()
    assert len(times) == epochs, times
    return {"epoch_s": times, "epoch_cpu_s": cpu}


def worker_bare(model_dir: str, epochs: int, gate: Gate) -> dict:
    """Only the UNet work of one epoch (see the module docstring)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    sched = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    sched.set_timesteps(NUM_STEPS)
    c, s = unet.config.in_channels, unet.config.sample_size
    hidden = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    n = SAMPLE_BATCH * NUM_BATCHES
    emb = torch.randn(n, 77, hidden, generator=g)
    neg = torch.randn(n, 77, hidden, generator=g)

    def guided(x, t, pe, ne):
        eps = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([ne, pe])).sample
        u, cnd = eps.chunk(2)
        return u + GUIDANCE * (cnd - u)

    times, cpu, sample_s, train_s = [], [], [], []
    for _ in range(epochs):
        gate.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        unet.eval()
        lat = []
        with torch.no_grad():
            for b in range(NUM_BATCHES):
                x = torch.randn(SAMPLE_BATCH, c, s, s, generator=g)
                sl = slice(b * SAMPLE_BATCH, (b + 1) * SAMPLE_BATCH)
                for t in sched.timesteps:
                    lat.append(x)
                    x = x - 0.01 * guided(x, t.expand(SAMPLE_BATCH), emb[sl], neg[sl])
        t1 = time.perf_counter()
        unet.train()
        for b0 in range(0, n, TRAIN_BATCH):
            for j in range(NUM_STEPS):
                lb, off = divmod(b0, SAMPLE_BATCH)  # the stored latents of these samples at step j
                x = lat[lb * NUM_STEPS + j][off : off + TRAIN_BATCH]
                t = sched.timesteps[j].expand(TRAIN_BATCH)
                eps = guided(x, t, emb[b0 : b0 + TRAIN_BATCH], neg[b0 : b0 + TRAIN_BATCH])
                eps.square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        times.append(t2 - t0)
        cpu.append(time.process_time() - c0)
        gate.done()
        sample_s.append(t1 - t0)
        train_s.append(t2 - t1)
    return {"epoch_s": times, "epoch_cpu_s": cpu, "sample_s": sample_s, "train_s": train_s}


def run_worker(args) -> None:
    _threads(args.threads)
    gate = Gate(args.ctl_in, args.ctl_out)
    if args.worker == "drl":
        res = worker_drl(args.model_dir, args.epochs, args.work_dir, gate, args.profile_out)
    elif args.worker == "trl":
        res = worker_trl(args.model_dir, args.epochs, args.work_dir, gate)
    else:
        res = worker_bare(args.model_dir, args.epochs, gate)
    import torch

    res["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _worker_cmd(kind, python, model_dir: Path, work: Path, epochs: int, threads: int) -> tuple[list[str], dict, Path]:
    result = work / f"{kind}.json"
    cmd = [
        str(python), str(Path(__file__).resolve()), "--worker", kind, "--epochs", str(epochs),
        "--threads", str(threads), "--model-dir", str(model_dir), "--work-dir", str(work / f"{kind}_run"),
        "--result", str(result),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return cmd, env, result


def spawn(kind: str, python, model_dir: Path, work: Path, epochs: int, threads: int, log, profile_out=None) -> dict:
    """One worker on its own (no lock-step); used by --profile."""
    cmd, env, result = _worker_cmd(kind, python, model_dir, work, epochs, threads)
    if profile_out:
        cmd += ["--profile-out", str(profile_out)]
    proc = subprocess.run(cmd, stdout=log, stderr=log, env=env, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); see {log.name}")
    return json.loads(result.read_text())


def run_lockstep(sides: list[str], pythons: dict, model_dir: Path, work: Path, epochs: int, threads: int, log,
                 rotate: int) -> dict:
    """Start one worker per side (they load their models concurrently), then run epoch e of every side in turn,
    one side computing at a time; the order rotates every epoch (and by `rotate` between rounds)."""
    procs, ctl = {}, {}
    try:
        for kind in sides:
            to_w_r, to_w_w = os.pipe()  # driver -> worker
            fr_w_r, fr_w_w = os.pipe()  # worker -> driver
            cmd, env, result = _worker_cmd(kind, pythons[kind], model_dir, work, epochs, threads)
            cmd += ["--ctl-in", str(to_w_r), "--ctl-out", str(fr_w_w)]
            procs[kind] = (subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=HERE.parent,
                                            pass_fds=(to_w_r, fr_w_w)), result)
            os.close(to_w_r)
            os.close(fr_w_w)
            ctl[kind] = (os.fdopen(to_w_w, "w"), os.fdopen(fr_w_r, "r"))

        def expect(kind: str, word: str) -> None:
            line = ctl[kind][1].readline().strip()
            if line != word:
                procs[kind][0].wait()
                raise RuntimeError(f"{kind} worker failed (exit {procs[kind][0].returncode}); see {log.name}")

        for e in range(epochs):
            k = (e + rotate) % len(sides)
            order = sides[k:] + sides[:k]
            for kind in order:
                expect(kind, "ready")
                ctl[kind][0].write("go\n")
                ctl[kind][0].flush()
                expect(kind, "done")
            print(f"[bench]   epoch {e + 1}/{epochs} done ({' -> '.join(order)})", flush=True)
        out = {}
        for kind, (proc, result) in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); see {log.name}")
            out[kind] = json.loads(result.read_text())
            result.unlink()
        return out
    finally:
        for w, r in ctl.values():
            w.close()
            r.close()
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()


def make_model(model_dir: Path) -> None:
    from diffusion_rl.models import build_tiny_pipeline

    build_tiny_pipeline(0).save_pretrained(str(model_dir))


def versions(env: Path) -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    import diffusion_rl

    out = {
        "drl": diffusion_rl.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
    }
    trl = subprocess.run([str(env_python(env)), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    out["trl"] = trl.stdout.strip() or "missing"
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the TRL env (--env) and exit")
    ap.add_argument("--env", type=Path, default=DEFAULT_ENV, help=f"TRL venv (default {DEFAULT_ENV})")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run, >= 3; epochs 2..N are timed (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each starts fresh drl/TRL/bare processes run in lock-step (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every side (default 1)")
    ap.add_argument("--json", type=Path, help="write all measurements to this file")
    ap.add_argument("--skip-trl", action="store_true", help="measure drl and bare only")
    ap.add_argument("--profile", action="store_true", help="cProfile one drl epoch (epoch 2) and print the top entries")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (model, run dirs, worker log)")
    # internal (worker processes)
    ap.add_argument("--worker", choices=["drl", "trl", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--ctl-in", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ctl-out", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        run_worker(args)
        return
    if args.setup:
        setup_env(args.env)
        return
    if args.epochs < 3:
        ap.error("--epochs must be >= 3 (epoch 1 is warm-up; at least two timed epochs)")
    if not args.skip_trl and not args.profile and not env_python(args.env).exists():
        sys.exit(f"no TRL env at {args.env}; create it with: {sys.executable} {__file__} --setup  (or pass --skip-trl)")

    work = Path(tempfile.mkdtemp(prefix="drl_trl_bench_"))
    model_dir = work / "tiny"
    make_model(model_dir)
    log = open(work / "workers.log", "w")

    if args.profile:
        prof = work / "drl_epoch2.prof"
        spawn("drl", sys.executable, model_dir, work, 2, args.threads, log, profile_out=prof)
        import pstats

        for key in ("cumulative", "tottime"):
            print(f"\n==== drl epoch 2, sorted by {key} ({args.threads} thread(s)) ====")
            pstats.Stats(str(prof)).strip_dirs().sort_stats(key).print_stats(30)
        print(f"profile: {prof} (scratch kept)")
        return

    sides = ["drl", "bare"] + ([] if args.skip_trl else ["trl"])
    pythons = {"drl": sys.executable, "bare": sys.executable, "trl": env_python(args.env)}
    runs = {k: [] for k in sides}
    load_before = os.getloadavg()
    t_start = time.time()
    for r in range(args.rounds):
        print(f"[bench] round {r + 1}/{args.rounds}: {', '.join(sides)} in lock-step, {args.epochs} epochs each", flush=True)
        res = run_lockstep(sides, pythons, model_dir, work, args.epochs, args.threads, log, rotate=r)
        for kind in sides:
            runs[kind].append(res[kind])
            print(f"[bench]   {kind:>4} epoch s: {', '.join(f'{x:.2f}' for x in res[kind]['epoch_s'])}"
                  f"  (cpu {', '.join(f'{x:.2f}' for x in res[kind]['epoch_cpu_s'])}; first is warm-up)", flush=True)
    load_after = os.getloadavg()
    log.close()

    def timed(kind: str, key: str = "epoch_s") -> list[float]:
        return [x for run in runs.get(kind, []) for x in run[key][1:]]

    def paired(a: str, b: str, key: str) -> list[float]:
        """Ratio of epoch e of side a to epoch e of side b (run back to back in lock-step), every timed epoch."""
        return [
            xa / xb
            for ra, rb in zip(runs.get(a, []), runs.get(b, []), strict=False)
            for xa, xb in zip(ra[key][1:], rb[key][1:], strict=True)
        ]

    nan = float("nan")
    med = {k: median(timed(k)) for k in runs}
    med_cpu = {k: median(timed(k, "epoch_cpu_s")) for k in runs}
    ratio = {
        "wall": {"drl_over_trl": med["drl"] / med.get("trl", nan), "drl_over_bare": med["drl"] / med["bare"],
                 "bare_over_trl": med["bare"] / med.get("trl", nan)},
        "cpu": {"drl_over_trl": med_cpu["drl"] / med_cpu.get("trl", nan), "drl_over_bare": med_cpu["drl"] / med_cpu["bare"],
                "bare_over_trl": med_cpu["bare"] / med_cpu.get("trl", nan)},
    }
    pairs = {
        m: {"drl_over_trl": paired("drl", "trl", key), "drl_over_bare": paired("drl", "bare", key)}
        for m, key in (("wall", "epoch_s"), ("cpu", "epoch_cpu_s"))
    }

    def ok(x, target):
        return "n/a" if x != x else ("met" if x <= target else "NOT met")

    def fmt(xs):
        return f"median {median(xs):.2f} [{min(xs):.2f}..{max(xs):.2f}]" if xs else "n/a"

    print()
    print(f"Workload: tiny SD pipeline, LoRA r{LORA_RANK}, {NUM_STEPS} DDIM steps, CFG {GUIDANCE}, "
          f"{SAMPLE_BATCH * NUM_BATCHES} samples/epoch (sample batch {SAMPLE_BATCH}, train batch {TRAIN_BATCH}), JPEG reward")
    print(f"threads {args.threads} | epochs/run {args.epochs} (epochs 2..{args.epochs} timed) | rounds {args.rounds} | "
          f"load avg {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    print("wall = median wall-clock s per epoch; cpu = median process CPU s per epoch (less sensitive to other load)")
    print()
    rows = [("", "wall", "cpu", "")]
    rows.append(("drl epoch (s)", f"{med['drl']:.3f}", f"{med_cpu['drl']:.3f}",
                 f"sample {median(timed('drl', 'sample_s')):.3f} + train {median(timed('drl', 'train_s')):.3f} wall; "
                 f"trainer's perf/epoch_s {median(timed('drl', 'trainer_epoch_s')):.3f}"))
    rows.append(("TRL DDPOTrainer epoch (s)", f"{med.get('trl', nan):.3f}", f"{med_cpu.get('trl', nan):.3f}",
                 "" if "trl" in runs else "skipped"))
    rows.append(("ratio drl / TRL", f"{ratio['wall']['drl_over_trl']:.3f}", f"{ratio['cpu']['drl_over_trl']:.3f}",
                 f"target <= {TARGET_VS_TRL}: wall {ok(ratio['wall']['drl_over_trl'], TARGET_VS_TRL)}, "
                 f"cpu {ok(ratio['cpu']['drl_over_trl'], TARGET_VS_TRL)}; paired epochs: wall {fmt(pairs['wall']['drl_over_trl'])}"
                 f", cpu {fmt(pairs['cpu']['drl_over_trl'])}"))
    rows.append(("bare UNet fwd/bwd epoch (s)", f"{med['bare']:.3f}", f"{med_cpu['bare']:.3f}",
                 f"sample fwd {median(timed('bare', 'sample_s')):.3f} + train fwd/bwd {median(timed('bare', 'train_s')):.3f} wall"))
    rows.append(("ratio drl / bare", f"{ratio['wall']['drl_over_bare']:.3f}", f"{ratio['cpu']['drl_over_bare']:.3f}",
                 f"target <= {TARGET_VS_BARE}: wall {ok(ratio['wall']['drl_over_bare'], TARGET_VS_BARE)}, "
                 f"cpu {ok(ratio['cpu']['drl_over_bare'], TARGET_VS_BARE)}; paired epochs: wall {fmt(pairs['wall']['drl_over_bare'])}"
                 f", cpu {fmt(pairs['cpu']['drl_over_bare'])}"))
    rows.append(("ratio bare / TRL (floor of drl/TRL)", f"{ratio['wall']['bare_over_trl']:.3f}",
                 f"{ratio['cpu']['bare_over_trl']:.3f}", "drl cannot go below this without doing less UNet work"))
    w = max(len(r[0]) for r in rows)
    for name, wall, cpu, note in rows:
        print(f"  {name:<{w}}  {wall:>7}  {cpu:>7}   {note}")

    if args.json:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t_start)),
            "threads": args.threads, "epochs": args.epochs, "rounds": args.rounds,
            "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
            "versions": versions(args.env),
            "workload": {
                "num_steps": NUM_STEPS, "sample_batch": SAMPLE_BATCH, "num_batches": NUM_BATCHES,
                "train_batch": TRAIN_BATCH, "images_per_prompt": IMAGES_PER_PROMPT, "guidance": GUIDANCE,
                "lora_rank": LORA_RANK, "reward": "jpeg_compressibility",
            },
            "median_epoch_s": {"wall": med, "cpu": med_cpu},
            "ratios": ratio,
            "paired_epoch_ratios": pairs,
            "targets": {
                "drl_over_trl": TARGET_VS_TRL, "drl_over_bare": TARGET_VS_BARE,
                "met_wall": {"trl": ratio["wall"]["drl_over_trl"] <= TARGET_VS_TRL,
                             "bare": ratio["wall"]["drl_over_bare"] <= TARGET_VS_BARE},
                "met_cpu": {"trl": ratio["cpu"]["drl_over_trl"] <= TARGET_VS_TRL,
                            "bare": ratio["cpu"]["drl_over_bare"] <= TARGET_VS_BARE},
            },
            "runs": runs,
        }
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\njson: {args.json}")
    if args.keep:
        print(f"scratch: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
