"""A stand-in for the `vllm` package, which needs CUDA and cannot be installed here, for tests/test_reason_vllm.py.

Only what cannot run here is faked, in vLLM's shapes: `LLM(model=dir, ...)` loads the transformers model (random weights
with `load_format="dummy"`, as vLLM) and tokenizer from `dir` and samples from that model itself (temperature, top-k with -1 = off, top-p, eos / stop token ids / stop
strings, max_tokens, a seed per request with child i of n seeded seed + i, the sampled token's processed log-prob
with `logprobs=0`); `generate(prompts, sampling_params)` returns `RequestOutput`s holding `CompletionOutput`s
(index, text, token_ids, cumulative_logprob, logprobs as one {token_id: Logprob} per position, finish_reason "stop" or
"length", stop_reason); the in-process model behind
`llm.llm_engine.model_executor.driver_worker.model_runner.model` has a `load_weights` that copies the pushed tensors
into the sampling model by name and records them. `SamplingParams` rejects unknown fields and vLLM's invalid values.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=16, stop=None, stop_token_ids=None,
                    include_stop_str_in_output=False, seed=None, logprobs=None, skip_special_tokens=True,
                    ignore_eos=False, repetition_penalty=1.0)

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        for k, v in {**self.DEFAULTS, **kwargs}.items():
            setattr(self, k, v)
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError("n and max_tokens must be at least 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]


class EngineModel:
    """The model behind the engine: `load_weights` as vLLM's, copying each (name, tensor) into the sampling model."""

    def __init__(self, hf_model):
        self.hf_model = hf_model
        self.pushed: list[tuple[str, torch.Tensor]] = []

    @torch.no_grad()
    def load_weights(self, weights):
        params = dict(self.hf_model.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"the engine's model has no parameter {name!r}")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
            params[name].data.copy_(tensor.to(params[name].dtype))
            self.pushed.append((name, tensor.detach().clone()))
            loaded.add(name)
        return loaded


class LLM:
    instances: list[LLM] = []

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.model_path, self.kwargs = model, kwargs
        if kwargs.get("load_format", "auto") == "dummy":  # vLLM: random weights, only the config is read
            self.hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch.float32).eval()
        else:
            self.hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.engine_model = EngineModel(self.hf_model)
        runner = types.SimpleNamespace(model=self.engine_model)
        self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner)))
        self.prefix_cache_resets = 0
        self.calls: list[tuple[list, list]] = []
        LLM.instances.append(self)

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache_resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("the lengths of prompts and sampling_params must be the same")
        self.calls.append((prompts, params))
        outputs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            ids = list(prompt["prompt_token_ids"])
            children = [self._sample(ids, sp, index) for index in range(sp.n)]
            outputs.append(RequestOutput(str(i), None, ids, children))
        return outputs

    def _sample(self, prompt_ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        tok = self.tokenizer
        generator = torch.Generator().manual_seed(sp.seed + index) if sp.seed is not None else None
        ids, out, logprobs, cumulative = list(prompt_ids), [], [], 0.0
        finish, stop_reason = "length", None
        for _ in range(sp.max_tokens):
            logits = self.hf_model(torch.tensor([ids])).logits[0, -1].float()
            if sp.temperature == 0:
                logp = torch.log_softmax(logits, -1)
                token = int(logits.argmax())
            else:
                logits = logits / sp.temperature
                if sp.top_k > 0:
                    kth = torch.topk(logits, sp.top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if sp.top_p < 1.0:
                    order = torch.argsort(logits, descending=True)
                    probs = torch.softmax(logits[order], -1)
                    drop = probs.cumsum(0) - probs > sp.top_p
                    logits[order[drop]] = float("-inf")
                logp = torch.log_softmax(logits, -1)  # processed log-probs: what is sampled from
                token = int(torch.multinomial(logp.exp(), 1, generator=generator))
            out.append(token)
            ids.append(token)
            cumulative += float(logp[token])
            if sp.logprobs is not None:
                logprobs.append({token: Logprob(float(logp[token]), int((logp > logp[token]).sum()) + 1)})
            if not sp.ignore_eos and token == tok.eos_token_id:
                finish = "stop"
                break
            if token in (sp.stop_token_ids or ()):
                finish, stop_reason = "stop", token
                break
            text = tok.decode(out, skip_special_tokens=sp.skip_special_tokens)
            hit = next((s for s in sp.stop or () if s in text), None)
            if hit is not None:
                finish, stop_reason = "stop", hit
                break
        text = tok.decode(out, skip_special_tokens=sp.skip_special_tokens)
        if isinstance(stop_reason, str):
            cut = text.index(stop_reason)
            text = text[: cut + len(stop_reason)] if sp.include_stop_str_in_output else text[:cut]
        return CompletionOutput(index, text, out, cumulative, logprobs if sp.logprobs is not None else None, finish,
                                stop_reason)


def module() -> types.ModuleType:
    """A fresh `vllm` module object (for `sys.modules["vllm"]`)."""
    LLM.instances = []
    mod = types.ModuleType("vllm")
    mod.__version__ = "0.0.0+fake"
    mod.LLM, mod.SamplingParams, mod.RequestOutput, mod.CompletionOutput = LLM, SamplingParams, RequestOutput, CompletionOutput
    mod.Logprob = Logprob
    return mod
