"""The vLLM rollout backend (`rollout.backend: vllm`): the same `Rollouts` as `reasoning_rl.rollout.generate`, sampled
by an in-process `vllm.LLM` on the training GPU. An optional extra for CUDA machines: `pip install
'diffusion-rl[vllm]'` (vLLM is CUDA-only and pins its own torch).

What was taken from TRL 1.16's GRPOTrainer colocate mode (`trl/generation/vllm_generation.py`, `VLLMGeneration`, and
`trl/trainer/grpo_trainer.py`), and where this module differs:

- One engine per training process, in the process itself (`distributed_executor_backend="external_launcher"`, with
  RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set from accelerate), seeded per process; each process
  generates its own prompts. `max_num_batched_tokens=4096` as TRL (vLLM's memory profiler is misled by its default).
- `logprobs_mode="processed_logprobs"`: the sampled tokens' log-probs after temperature / top-k / top-p, i.e. the
  distribution vLLM actually sampled from, which is what an importance-sampling correction needs.
- Prompts go in as token ids (`{"prompt_token_ids": ids}`), so vLLM sees exactly the tokens the training forward
  sees; the unique prompts are sent once with `SamplingParams(n=G)`.
- Before each step's generation the policy's current weights are pushed with
  `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])`, one tensor at a
  time, under the base model's names: PEFT's `base_model.model.` prefix and `.base_layer` removed, `lora_*` tensors
  skipped, `modules_to_save.default.` unwrapped, its `original_module` skipped. Then `llm.reset_prefix_cache()`: the
  prefix cache holds keys/values computed with the old weights.
- LoRA: TRL calls `merge_adapter()`, reads the weights and `unmerge_adapter()`s. Here the merged tensor
  `W + delta_W.to(W.dtype)` (peft's own merge arithmetic, `get_delta_weight`) is computed per layer without writing into
  the model: the same numbers, but a bf16 merge/unmerge round trip can no longer drift the frozen base weights.
- The importance-sampling correction of the vLLM/trainer mismatch (TRL `vllm_importance_sampling_*`, after Yao et al.
  2025, "Your efficient RL framework secretly brings you off-policy RL training"): `importance_weights` below, with
  TRL's four modes and its NaN rule; the weights multiply each token's policy loss (the trainer folds them into the
  advantages, which for weights >= 0 is the same thing, see `importance_weights`).
- Not taken: server mode, tensor parallelism, sleep mode, structured outputs, and images (refused with a clear error;
  vision-language models stay on `rollout.backend: transformers`).

Completions follow the transformers backend's conventions: the completion ids are exactly vLLM's tokens (its eos
included), right-padded with the pad id; the mask covers those tokens; `stopped` is vLLM's `finish_reason == "stop"`
(eos, a stop token or a stop string; stop strings are kept in the completion); the text is the tokenizer's decode of
the ids without special tokens, as the transformers backend decodes them. vLLM also ends a sequence at the eos ids of
the model's generation config, which transformers `generate` here does not.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from reasoning_rl.models import ModelLoadError
from reasoning_rl.rollout import Rollouts, encode_prompts

IMPORTANCE_SAMPLING_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
INSTALL_HINT = ("pip install 'diffusion-rl[vllm]' on a CUDA machine (vLLM is CUDA-only and brings its own torch), or "
                "set rollout.backend=transformers")


class VLLMUnavailableError(ModelLoadError):
    """rollout.backend=vllm cannot run here (its engine cannot be loaded); the message says why and what to do."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def import_vllm():
    """The `vllm` module, or a clear error when it is not installed or there is no CUDA device."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailableError(f"rollout.backend=vllm needs the vllm package, which is not importable ({err}); "
                                   f"{INSTALL_HINT}") from None
    if not cuda_available():
        raise VLLMUnavailableError("rollout.backend=vllm needs a CUDA GPU (vLLM runs on CUDA only) and torch sees "
                                   "none; set rollout.backend=transformers on this machine")
    return vllm


# ------------------------------------------------------------------------------------------------ weights


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _merged_lora_weight(layer) -> torch.Tensor:
    """The layer's base weight with its active adapters merged in, as peft's `merge` computes it, without writing it."""
    base = layer.get_base_layer()
    weight = base.weight.detach()
    if getattr(layer, "merged", False):  # already merged into the base weight
        return weight
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"rollout.backend=vllm pushes plain LoRA merges only; adapter {adapter!r} of "
                             f"{type(layer).__name__} is a variant (DoRA, ...) or has a LoRA bias")
        weight = weight + layer.get_delta_weight(adapter).detach().to(weight.dtype)
    return weight


@torch.no_grad()
def merged_named_weights(model):
    """(name, tensor) of every weight of `model` as vLLM's copy of the base model names it; under LoRA the adapters
    merged into their base layers. Tied weights come once (as `named_parameters` yields them)."""
    if not _is_peft(model):
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    from peft.tuners.lora import LoraLayer

    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    prefix = getattr(model, "prefix", "lora_")
    for name, param in model.named_parameters():
        if prefix in name or "original_module" in name:  # adapters (merged below), a modules_to_save's original
            continue
        tensor = param.detach()
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in lora_layers and leaf == "weight":
            tensor = _merged_lora_weight(lora_layers[owner[: -len(".base_layer")]])
        name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace("modules_to_save.default.", "")
        yield name, tensor


# ------------------------------------------------------------------------------------------------ importance sampling


def importance_weights(trainer_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap_max: float | None = 3.0, cap_min: float | None = None) -> torch.Tensor:
    """[B, C] fp32 weights correcting for vLLM sampling from a slightly different distribution than the trainer's
    (bf16 kernels, another attention implementation): rho = pi_train(o_t) / pi_vllm(o_t), with pi_train the trainer's
    log-probs of the sampled tokens at the weights vLLM sampled with, and pi_vllm vLLM's (processed) log-probs.

        token_*     rho_t = exp(logp_train_t - logp_vllm_t)                     (one weight per token)
        sequence_*  rho   = exp(sum_t m_t (logp_train_t - logp_vllm_t))         (one weight per sequence, all tokens)
        *_truncate  w = clamp(rho, cap_min, cap_max)                            (truncated IS, TIS)
        *_mask      w = rho where cap_min <= rho <= cap_max, else 0             (masked IS, MIS)

    A NaN vLLM log-prob (or a row with no vLLM log-probs: a LUFFY trace) counts as no mismatch (difference 0), as in
    TRL. Masked positions get weight 1 (they carry no loss anyway). The weights are constants (no gradient).

    Applied as TRL does, per-token policy loss x w. The trainer passes w x A as the advantages instead: for w >= 0 the
    clipped surrogate satisfies max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r)) (and the dual clip's min likewise),
    so the two are the same loss and gradient; the KL term is not weighted (as TRL)."""
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"importance sampling mode {mode!r} is not one of {IMPORTANCE_SAMPLING_MODES}")
    m = mask.bool()
    if mode == "none":
        return torch.ones(trainer_logp.shape, dtype=torch.float32, device=trainer_logp.device)
    diff = torch.nan_to_num((trainer_logp.float() - sampling_logp.float()), nan=0.0) * m
    log_rho = diff.sum(-1, keepdim=True).expand_as(diff) if mode.startswith("sequence") else diff
    rho = torch.exp(log_rho)
    if mode.endswith("truncate"):
        w = rho.clamp(min=cap_min, max=cap_max) if (cap_min is not None or cap_max is not None) else rho
    else:
        low = -float("inf") if cap_min is None else cap_min
        high = float("inf") if cap_max is None else cap_max
        w = torch.where((rho >= low) & (rho <= high), rho, torch.zeros((), device=rho.device))
    return torch.where(m, w, torch.ones((), device=w.device)).detach()


def importance_metrics(weights: torch.Tensor, trainer_logp: torch.Tensor, sampling_logp: torch.Tensor,
                       mask: torch.Tensor) -> dict[str, float]:
    """Diagnostics of the mismatch over the real completion tokens: the weights' mean / min / max, the share of
    tokens whose weight was cut (mask modes: zeroed), and the largest |logp_train - logp_vllm|."""
    m = mask.bool() & ~torch.isnan(sampling_logp)
    if not bool(m.any()):
        return {}
    w = weights[m]
    return {"vllm_is_weight_mean": float(w.mean()), "vllm_is_weight_min": float(w.min()),
            "vllm_is_weight_max": float(w.max()), "vllm_is_weight_zero_frac": float((w == 0).float().mean()),
            "vllm_logp_diff_max": float((trainer_logp[m].float() - sampling_logp[m].float()).abs().max())}


# ------------------------------------------------------------------------------------------------ the engine


def engine_model_source(model, processor, pretrained: str, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(what vllm.LLM loads, a temporary directory to delete once the engine is built or None, vLLM's load_format).
    A hub id or a transformers directory is loaded as it is. A built-in model or a GGUF file has no directory vLLM can
    read: its config, generation config and tokenizer are written to a temporary directory and the engine starts with
    vLLM's `dummy` weights, since the policy's weights are pushed before every generation anyway."""
    local = Path(pretrained)
    if not pretrained.startswith("builtin:") and not gguf_file and (not local.exists() or (local / "config.json").is_file()):
        return pretrained, None, "auto"
    tmp = tempfile.mkdtemp(prefix="drl-vllm-model-")
    base = model.get_base_model() if _is_peft(model) else model
    base.config.save_pretrained(tmp)
    base.generation_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return tmp, tmp, "dummy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMRollout:
    """An in-process vLLM engine generating the trainer's rollouts (TRL's colocate mode), with `generate` taking the
    same arguments and returning the same `Rollouts` as `reasoning_rl.rollout.generate`."""

    def __init__(self, model, processor, pretrained: str, *, gguf_file: str | None = None, revision: str | None = None,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 dtype: str = "auto", seed: int = 0, max_num_seqs: int | None = None, logprobs: bool = False,
                 process_index: int = 0, local_process_index: int = 0, num_processes: int = 1):
        vllm = import_vllm()
        self._vllm = vllm
        self.logprobs = logprobs
        # vLLM's external launcher reads the torch.distributed environment of the training processes (as TRL sets it)
        os.environ["RANK"] = str(process_index)
        os.environ["LOCAL_RANK"] = str(local_process_index)
        os.environ["WORLD_SIZE"] = str(num_processes)
        os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "localhost"
        if os.environ.get("MASTER_PORT", "").strip().lower() in ("", "0", "auto"):
            os.environ["MASTER_PORT"] = str(_free_port())
        source, tmp, load_format = engine_model_source(model, processor, pretrained, gguf_file)
        try:
            self.llm = vllm.LLM(
                model=source, tokenizer=source, revision=None if tmp else revision, load_format=load_format, dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                seed=seed + process_index, distributed_executor_backend="external_launcher",
                max_num_batched_tokens=4096, logprobs_mode="processed_logprobs", trust_remote_code=trust_remote_code,
                tensor_parallel_size=1,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.pushes = 0

    def _engine_model(self):
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError as err:
            raise VLLMUnavailableError(
                f"this vLLM ({getattr(self._vllm, '__version__', '?')}) does not expose its in-process model at "
                f"llm.llm_engine.model_executor.driver_worker.model_runner.model ({err}), where the trainer pushes the "
                f"policy's weights; use a vLLM version TRL 1.16 supports (0.22 - 0.31) or rollout.backend=transformers"
            ) from None

    @torch.no_grad()
    def sync_weights(self, model) -> int:
        """Push the policy's current weights (LoRA merged) into the engine; returns how many tensors were pushed."""
        engine_model = self._engine_model()
        count = 0
        for name, tensor in merged_named_weights(model):
            engine_model.load_weights([(name, tensor)])
            count += 1
        self.llm.reset_prefix_cache()  # cached keys/values were computed with the old weights
        self.pushes += 1
        return count

    @torch.no_grad()
    def generate(
        self, model, processor, texts: list[str], prompts: list[str], metadata: list[dict], num_generations: int,
        max_new_tokens: int, temperature: float, top_p: float, top_k: int, stop_strings: list[str], batch_size: int,
        images: list | None = None,
    ) -> Rollouts:
        """`num_generations` completions of each prompt text from the engine (G consecutive rows per prompt), as
        `reasoning_rl.rollout.generate` returns them; with `logprobs`, also `Rollouts.sampling_logp` [B, C] (vLLM's
        log-prob of each sampled token, NaN where it gave none). `batch_size` is unused (vLLM schedules its own
        batches); the request seeds are drawn from torch's global RNG, which the trainer seeds per step."""
        if images is not None:
            raise ValueError("rollout.backend=vllm does not take image prompts yet (vision-language models); use "
                             "rollout.backend=transformers for them")
        device = next(model.parameters()).device
        tokenizer = getattr(processor, "tokenizer", processor)
        G = num_generations
        repeat = lambda items: [x for x in items for _ in range(G)]  # noqa: E731
        rollouts = encode_prompts(processor, repeat(texts), None, device)
        rollouts.prompts, rollouts.metadata = repeat(prompts), repeat(metadata)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        requests, params = [], []
        for i in range(len(texts)):
            row = i * G
            requests.append({"prompt_token_ids": rollouts.prompt_ids[row][rollouts.prompt_mask[row].bool()].tolist()})
            params.append(self._vllm.SamplingParams(
                n=G, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
                stop=list(stop_strings) or None, stop_token_ids=[eos], include_stop_str_in_output=True,
                seed=int(torch.randint(0, 2**31 - 1, ()).item()), logprobs=0 if self.logprobs else None,
            ))
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(texts) or any(len(o.outputs) != G for o in outputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} requests (expected {len(texts)}) or a request without "
                               f"{G} completions")
        samples = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]  # [B], G per prompt in order
        width = max(1, max(len(c.token_ids) for c in samples))
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, c in enumerate(samples):
            ids[i, : len(c.token_ids)] = torch.tensor(list(c.token_ids), dtype=torch.long)
            mask[i, : len(c.token_ids)] = 1
        rollouts.completion_ids, rollouts.completion_mask = ids.to(device), mask.to(device)
        rollouts.completions = tokenizer.batch_decode(torch.where(mask.bool(), ids, pad), skip_special_tokens=True)
        rollouts.stopped = torch.tensor([c.finish_reason == "stop" for c in samples], dtype=torch.bool, device=device)
        rollouts.pad_id = pad
        if self.logprobs:
            rollouts.sampling_logp = sampled_token_logprobs(samples, width).to(device)
        return rollouts


def sampled_token_logprobs(samples, width: int) -> torch.Tensor:
    """[B, width] fp32: vLLM's log-prob of each sampled token (`CompletionOutput.logprobs`: one {token_id: Logprob}
    per position, holding the sampled token with logprobs=0), NaN where it is missing, 0 after the completion."""
    out = torch.zeros((len(samples), width), dtype=torch.float32)
    for i, c in enumerate(samples):
        if c.logprobs is None:
            out[i, : len(c.token_ids)] = float("nan")
            continue
        for t, (token, position) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            entry = position.get(token) if position is not None else None
            value = getattr(entry, "logprob", None)
            out[i, t] = float("nan") if value is None else float(value)
    return out


def pad_sampling_logp(x: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Right-pad [B, C] sampling log-probs to `width` columns (with 0, outside every mask)."""
    return None if x is None else F.pad(x, (0, width - x.shape[1]), value=0.0)
