"""Reward registry: a plain dict ``name -> factory`` plus descriptive metadata for ``drl reward list``.

Model rewards are imported lazily (``_Lazy``) so ``import rewards`` stays light. ``load(name, **options)``
validates option names against the factory signature before anything is loaded.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewards.base import CallableReward, RewardError, RewardFn


class _Lazy:
    """A factory imported on first use: ``module:function``."""

    def __init__(self, module: str, function: str):
        self.module = module
        self.function = function

    def resolve(self) -> Callable[..., RewardFn]:
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            if exc.name == self.module:
                raise RewardError(
                    f"reward module {self.module!r} is not available (file missing); the reward is "
                    f"registered but its implementation is not installed in this checkout"
                ) from exc
            raise
        return getattr(mod, self.function)

    def __call__(self, **options: Any) -> RewardFn:
        return self.resolve()(**options)

    def __repr__(self) -> str:
        return f"_Lazy({self.module}:{self.function})"


@dataclass(frozen=True)
class RewardInfo:
    """What ``drl reward list`` shows."""

    weights: str
    output_range: str
    licence: str
    differentiable: bool
    description: str


REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": _Lazy("rewards.jpeg", "make_jpeg_compressibility"),
    "jpeg_incompressibility": _Lazy("rewards.jpeg", "make_jpeg_incompressibility"),
    "aesthetic": _Lazy("rewards.aesthetic", "make_aesthetic_reward"),
    "pickscore": _Lazy("rewards.pickscore", "make_pickscore_reward"),
    "imagereward": _Lazy("rewards.imagereward", "make_imagereward_reward"),
    "hpsv2": _Lazy("rewards.hps", "make_hpsv2_reward"),
    "hpsv2.1": _Lazy("rewards.hps", "make_hpsv21_reward"),
    "clipscore": _Lazy("rewards.clipscore", "make_clipscore_reward"),
    "shapes_alignment": _Lazy("rewards.shapes_alignment", "make_shapes_alignment_reward"),
    "math_answer": _Lazy("rewards.math_answer", "make_math_answer_reward"),
    "exact_match": _Lazy("rewards.text", "make_exact_match_reward"),
    "think_answer_format": _Lazy("rewards.text", "make_think_answer_format_reward"),
    "trl_function": _Lazy("rewards.trl_adapter", "make_trl_function_reward"),
    "satori": _Lazy("rewards.satori", "make_satori_reward"),
    "mathif_soft": _Lazy("rewards.mathif", "make_mathif_soft_reward"),
    "mathif_hard": _Lazy("rewards.mathif", "make_mathif_hard_reward"),
    "kimi_length": _Lazy("rewards.length", "make_kimi_length_reward"),
    "l1_exact": _Lazy("rewards.length", "make_l1_exact_reward"),
    "l1_max": _Lazy("rewards.length", "make_l1_max_reward"),
    "dapo_overlong": _Lazy("rewards.length", "make_dapo_overlong_reward"),
    "cosine_length": _Lazy("rewards.length", "make_cosine_length_reward"),
}

INFO: dict[str, RewardInfo] = {
    "jpeg_compressibility": RewardInfo(
        "-", "(-inf, 0] (-kB; 512px SD ~ -150..-10)", "no weights", False, "-(JPEG q95 size in kB)"
    ),
    "jpeg_incompressibility": RewardInfo(
        "-", "[0, inf) (kB; 512px SD ~ 10..150)", "no weights", False, "JPEG q95 size in kB"
    ),
    "aesthetic": RewardInfo(
        "openai/clip-vit-large-patch14 + trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth",
        "~1..10 (SD1.x ~5.5)",
        "head Apache-2.0; CLIP weights research use (OpenAI model card)",
        True,
        "LAION aesthetic predictor v2: linear MLP on L2-normalised CLIP ViT-L/14 image embedding",
    ),
    "pickscore": RewardInfo(
        "yuvalkirstain/PickScore_v1 (+ processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
        "~15..25 (100*cos; SD1.5 ~20-22)",
        "code MIT; weights no licence declared (treat as research)",
        True,
        "exp(logit_scale) * cos(image, prompt)",
    ),
    "imagereward": RewardInfo(
        "THUDM/ImageReward:ImageReward.pt (+ tokenizer bert-base-uncased)",
        "~N(0,1), about -3..3",
        "Apache-2.0",
        True,
        "(MLP(BLIP CLS feature) - 0.16717) / 1.03334",
    ),
    "hpsv2": RewardInfo(
        "xswu/HPSv2:HPS_v2_compressed.pt (open_clip ViT-H-14)",
        "~0.2..0.35 (cos)",
        "Apache-2.0",
        True,
        "HPSv2.0: cos(image, prompt) of fine-tuned OpenCLIP ViT-H-14, no logit scale",
    ),
    "hpsv2.1": RewardInfo(
        "xswu/HPSv2:HPS_v2.1_compressed.pt (open_clip ViT-H-14)",
        "~0.2..0.35 (cos)",
        "Apache-2.0",
        True,
        "HPSv2.1: cos(image, prompt), not comparable with v2.0",
    ),
    "clipscore": RewardInfo(
        "openai/clip-vit-large-patch14",
        "[0, w] (w=2.5: ~0.7..0.9 typical)",
        "CLIP weights research use (OpenAI model card)",
        True,
        "w * max(cos(image, caption), 0) (Hessel et al. 2021)",
    ),
    "shapes_alignment": RewardInfo(
        "-", "see rewards/shapes_alignment.py", "-", False, "prompt/shape alignment on the toy shapes task"
    ),
    "math_answer": RewardInfo(
        "-", "{0, 1} (NaN: no/unparseable ground truth)", "no weights (math-verify: Apache-2.0)", False,
        "text: final answer (<answer> tag / last \\boxed{}) == metadata 'answer', symbolic (math-verify)",
    ),
    "exact_match": RewardInfo(
        "-", "{0, 1} (NaN: no ground truth)", "no weights", False,
        "text: extracted answer == metadata 'answer' after case/whitespace normalisation",
    ),
    "think_answer_format": RewardInfo(
        "-", "{0, 1}", "no weights", False, "text: completion is exactly <think>...</think><answer>...</answer>"
    ),
    "trl_function": RewardInfo(
        "-", "that of the function", "-", False, "text: a TRL GRPOTrainer-style reward function, by import path"
    ),
    "satori": RewardInfo(
        "-", "[0, 4] with unit weights (NaN: missing caption/boxes/answers/image size)",
        "no weights (nltk: Apache-2.0, rouge-score: Apache-2.0)", False,
        "text (VQA): SATORI-R1 format + (BLEU-4 + ROUGE-L)/2 caption + union-IoU boxes + answer in list, weighted",
    ),
    "mathif_soft": RewardInfo(
        "-", "[0, 1] (+ correctness when combined; NaN: no/invalid constraints)",
        "no weights (if-verifiable/IFEval checkers: Apache-2.0)", False,
        "text: MathIF soft accuracy, fraction of IFEval constraints satisfied after the reasoning",
    ),
    "mathif_hard": RewardInfo(
        "-", "{0, 1} (+ correctness when combined; NaN: no/invalid constraints)",
        "no weights (if-verifiable/IFEval checkers: Apache-2.0)", False,
        "text: MathIF hard accuracy, 1 if all IFEval constraints are satisfied after the reasoning",
    ),
    "kimi_length": RewardInfo(
        "-", "c + [-0.5, 0.5] (NaN: no ground truth)", "no weights", False,
        "text: Kimi k1.5 group min-max length reward, correctness-gated, + correctness (tokenizer= the policy's)",
    ),
    "l1_exact": RewardInfo(
        "-", "(-inf, 1] (NaN: no target length / ground truth)", "no weights", False,
        "text: L1-Exact c - 0.0003*|n_gold - L|, n_gold from metadata or 'Think for N tokens.' (tokenizer=)",
    ),
    "l1_max": RewardInfo(
        "-", "[0, 1] (NaN: no target length / ground truth)", "no weights", False,
        "text: L1-Max c*clip(0.0003*(n_gold - L) + 0.5, 0, 1) in policy tokens (tokenizer=)",
    ),
    "dapo_overlong": RewardInfo(
        "-", "[-factor, 0] (+ correctness when given)", "no weights", False,
        "text: DAPO soft overlong punishment on token lengths, L_max 20480, L_cache 4096 (tokenizer=)",
    ),
    "cosine_length": RewardInfo(
        "-", "correct [0.5, 1], wrong [-1, -0.5] (NaN: no ground truth)",
        "no weights", False, "text: cosine-scaled length reward (Demystifying long CoT; TRL) in policy tokens (tokenizer=)",
    ),
}


PLUGIN_MODULES: list[str] = []
"""Modules that register more rewards when imported (added by the packages that own them, e.g. the reasoning half
adds its world and tool modules); imported on the first `available()` or on a `load()` of an unknown name, so
`drl reward list` and YAML configs see them without this package knowing who they are."""


def _import_plugins() -> None:
    while PLUGIN_MODULES:
        importlib.import_module(PLUGIN_MODULES.pop(0))


def available() -> list[str]:
    """Registered reward names, sorted."""
    _import_plugins()
    return sorted(REGISTRY)


def register(
    name: str, factory: Callable[..., RewardFn], info: RewardInfo | None = None, *, overwrite: bool = False
) -> None:
    """Add a reward factory under ``name`` (raises if taken unless ``overwrite``)."""
    if name in REGISTRY and not overwrite:
        raise RewardError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    REGISTRY[name] = factory
    INFO[name] = info or RewardInfo("-", "-", "-", False, getattr(factory, "__doc__", None) or "-")


def _check_options(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    sig = inspect.signature(factory)
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise RewardError(
            f"reward {name!r} has no option(s) {unknown}; accepted options: "
            f"{', '.join(accepted) if accepted else '(none)'}"
        )


def load(name: str, **options: Any) -> RewardFn:
    """Build the reward ``name`` once (models loaded now) and return its ``RewardFn``."""
    if name not in REGISTRY:
        _import_plugins()
    if name not in REGISTRY:
        raise RewardError(f"unknown reward {name!r}; available rewards: {', '.join(available())}")
    factory = REGISTRY[name]
    real = factory.resolve() if isinstance(factory, _Lazy) else factory
    _check_options(name, real, options)
    try:
        fn = real(**options)
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"could not load reward {name!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(fn, RewardFn):
        return fn
    if callable(fn):
        return _ForeignReward(name, fn)
    raise RewardError(f"factory of reward {name!r} returned {type(fn).__name__}, not a RewardFn")


class _ForeignReward(RewardFn):
    """Adapts a callable that is not a ``RewardFn`` subclass (validation, error wrapping, score_tensor)."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = str(getattr(fn, "name", name))
        self.differentiable = bool(getattr(fn, "differentiable", False)) and hasattr(fn, "score_tensor")
        self._fn = fn

    _score = CallableReward._score

    def score_tensor(self, samples, prompts=None):
        if not self.differentiable:
            return super().score_tensor(samples, prompts)
        return self._fn.score_tensor(samples, prompts)
