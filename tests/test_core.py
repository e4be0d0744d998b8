"""The shared core (diffusion_rl.core): no diffusers, old import paths, the optimizer-step guard under an fp16
gradient scaler, metric reduction, EMA, the trainer state written and read side by side."""

import json
import pkgutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import diffusion_rl.core
from diffusion_rl.core.run import (
    BestWeights,
    EMA,
    MetricAccumulator,
    NonFiniteTrainingError,
    OptimizerStepGuard,
    ResumeError,
    TrainerState,
    check_resume_config,
)

CORE_MODULES = sorted(f"diffusion_rl.core.{m.name}" for m in pkgutil.iter_modules(diffusion_rl.core.__path__))


def test_every_core_module_imports_without_diffusers():
    assert {"diffusion_rl.core.grpo", "diffusion_rl.core.config", "diffusion_rl.core.run"} <= set(CORE_MODULES)
    code = (
        "import importlib, json, sys\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('diffusers', 'transformers', 'peft') "
        "or k in ('diffusion_rl.trainer', 'diffusion_rl.sampling', 'diffusion_rl.models'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_old_import_paths_are_the_core_objects():
    from diffusion_rl import checkpoint as old_checkpoint
    from diffusion_rl import grpo as old_grpo
    from diffusion_rl.core import checkpoint, grpo

    assert old_grpo.policy_loss is grpo.policy_loss and old_grpo.PerPromptStatTracker is grpo.PerPromptStatTracker
    assert old_checkpoint.save is checkpoint.save and old_checkpoint.CheckpointError is checkpoint.CheckpointError
    from diffusion_rl.trainer import NonFiniteTrainingError as from_trainer

    assert from_trainer is NonFiniteTrainingError


# ------------------------------------------------------------------------------------------------
# optimizer-step guard
# ------------------------------------------------------------------------------------------------


def _accelerator_with_cpu_scaler(init_scale: float = 2.0**16):
    """accelerate gives no GradScaler on the CPU (fp16 needs CUDA there); install torch's CPU GradScaler where
    accelerate keeps its own, before `prepare`, so the AcceleratedOptimizer and clip_grad_norm_ use it exactly
    as they use the CUDA one."""
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    acc.native_amp, acc.state._mixed_precision = True, "fp16"  # unscale_gradients() checks both
    return acc


def _model_and_guard(acc, max_consecutive=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    guard = OptimizerStepGuard(acc, list(model.parameters()), optimizer, scheduler, 1.0, max_consecutive)
    return model, guard


def _backward(acc, model, poison: bool):
    x = torch.ones(4, 3)
    y = model(x)
    if poison:  # a finite loss whose gradient overflows: the fp16 case a gradient scaler exists for
        y = y + (y * 1e30 - (y * 1e30).detach()) * 1e30
    loss = y.pow(2).mean()
    acc.backward(loss)
    return loss


def test_skipped_overflow_step_backs_the_scale_off_and_training_goes_on():
    acc = _accelerator_with_cpu_scaler()
    model, guard = _model_and_guard(acc)
    before = [p.detach().clone() for p in model.parameters()]
    loss = _backward(acc, model, poison=True)
    assert torch.isfinite(loss)
    assert guard.step(loss) is None  # skipped
    assert acc.scaler.get_scale() == 2.0**15  # backed off by the scaler's factor 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert guard.overflow_skipped == 1 and guard.nonfinite_skipped == 0 and guard.consecutive_bad == 0
    # the next step unscales again (without the scaler update: "unscale_() has already been called")
    loss = _backward(acc, model, poison=False)
    assert guard.step(loss) is not None
    assert guard.global_step == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_overflow_at_a_scale_below_one_counts_as_non_finite_and_aborts():
    acc = _accelerator_with_cpu_scaler(init_scale=1.0)  # one backoff takes it below 1
    model, guard = _model_and_guard(acc, max_consecutive=2)
    guard.step(_backward(acc, model, poison=True))
    assert guard.nonfinite_skipped == 1 and guard.overflow_skipped == 0
    with pytest.raises(NonFiniteTrainingError, match="2 optimizer steps in a row"):
        guard.step(_backward(acc, model, poison=True))


def test_non_finite_loss_without_scaler_is_skipped_then_aborts():
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=True)
    model, guard = _model_and_guard(acc, max_consecutive=2)
    loss = model(torch.ones(2, 3)).mean() * float("nan")
    acc.backward(loss)
    assert guard.step(loss) is None and guard.nonfinite_skipped == 1
    loss = model(torch.ones(2, 3)).pow(2).mean()
    acc.backward(loss)
    assert guard.step(loss) is not None and guard.consecutive_bad == 0
    for _ in range(2):
        loss = model(torch.ones(2, 3)).mean() * float("inf")
        acc.backward(loss)
        if guard.consecutive_bad == 1:
            with pytest.raises(NonFiniteTrainingError):
                guard.step(loss)
        else:
            guard.step(loss)


# ------------------------------------------------------------------------------------------------
# metrics, EMA, trainer state
# ------------------------------------------------------------------------------------------------


def test_metric_accumulator_means_and_true_extremes():
    acc = MetricAccumulator()
    acc.add({"policy_loss": 1.0, "ratio_min": 0.90, "ratio_max": 1.01})
    acc.add({"policy_loss": 3.0, "ratio_min": 0.99, "ratio_max": 1.30})
    assert acc.result() == {"policy_loss": 2.0, "ratio_min": 0.90, "ratio_max": 1.30}


def test_ema_update_apply_and_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update()  # 0.5 * 0 + 0.5 * 4
    assert torch.allclose(ema.shadow[0], torch.full((3,), 2.0))
    with ema.applied():
        assert torch.equal(p.detach(), torch.full((3,), 2.0))
    assert torch.equal(p.detach(), torch.full((3,), 4.0))  # live weights restored
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    state, tensors = TrainerState().to_dict({"ema": ema})
    json.dumps(state)  # the JSON part holds no tensor
    assert list(tensors) == ["ema.shadow.0"]
    TrainerState.restore(state, tensors, {"ema": other}, world_size=1, where="test")
    assert other.decay == 0.5 and other.num_updates == 1 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="decay"):
        EMA([p], decay=1.0)


def test_best_weights_keep_the_highest_scoring_copy_and_round_trip():
    p = torch.nn.Parameter(torch.zeros(2))
    best = BestWeights([p])
    assert best.state_dict()["score"] is None  # JSON-safe before any score
    assert not best.offer(float("nan"), 1)  # an unscorable validation never wins
    with torch.no_grad():
        p.fill_(1.0)
    assert best.offer(0.5, 1)
    with torch.no_grad():
        p.fill_(2.0)
    assert not best.offer(0.5, 2)  # a tie keeps the earlier weights
    with torch.no_grad():
        p.fill_(3.0)
    assert best.offer(0.7, 3) and (best.score, best.epoch) == (0.7, 3)
    with torch.no_grad():
        p.fill_(4.0)
    assert not best.offer(0.6, 4)
    state, tensors = TrainerState().to_dict({"best": best})
    json.dumps(state)
    assert list(tensors) == ["best.weights.0"]
    best.copy_to_params()
    assert torch.equal(p.detach(), torch.full((2,), 3.0))
    other = BestWeights([torch.nn.Parameter(torch.zeros(2))])
    TrainerState.restore(state, tensors, {"best": other}, world_size=1, where="test")
    assert (other.score, other.epoch) == (0.7, 3) and torch.equal(other.weights[0], torch.full((2,), 3.0))
    empty, empty_tensors = TrainerState().to_dict({"best": BestWeights([p])})
    fresh = BestWeights([p])
    TrainerState.restore(empty, empty_tensors, {"best": fresh}, world_size=1, where="test")
    assert fresh.score == float("-inf") and fresh.weights == []
    with pytest.raises(RuntimeError, match="before any finite score"):
        fresh.copy_to_params()
    with pytest.raises(ResumeError, match="1 tensors, the model has 2"):
        BestWeights([p, torch.nn.Parameter(torch.zeros(1))]).load_state_dict(best.state_dict())


def test_trainer_state_restore_checks_processes_and_missing_components():
    state, tensors = TrainerState(epochs_done=2, global_step=8, world_size=2).to_dict({})
    with pytest.raises(ResumeError, match="2 process"):
        TrainerState.restore(state, tensors, {}, world_size=1, where="ckpt")
    ema = EMA([torch.nn.Parameter(torch.zeros(1))], 0.9)
    with pytest.raises(ResumeError, match="no state for 'ema'"):
        TrainerState.restore(state, tensors, {"ema": ema}, world_size=2, where="ckpt")
    restored = TrainerState.restore(state, tensors, {"ema": None}, world_size=2, where="ckpt")
    assert (restored.epochs_done, restored.global_step) == (2, 8)


def test_resume_config_rules():
    saved = {"model": {"a": 1}, "train": {"lr": 1}, "num_epochs": 3}
    assert check_resume_config(saved, {"model": {"a": 1}, "train": {"lr": 2}, "num_epochs": 5},
                               free=("num_epochs",), fixed=("model",)) == ["train"]
    with pytest.raises(ResumeError, match="model settings differ"):
        check_resume_config(saved, {"model": {"a": 2}, "train": {"lr": 1}, "num_epochs": 3}, (), ("model",))
