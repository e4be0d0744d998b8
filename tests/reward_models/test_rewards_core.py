"""Contract, JPEG, registry, check_scores, multi-reward, AsyncScorer (no models needed)."""

import io
import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import RewardError, check_scores
from rewards.base import CallableReward, RewardFn
from rewards.multi import MultiReward


def _images(seed=0, n=3, size=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = 0.5  # flat grey
    return x


def _jpeg_kb(arr_hwc_uint8, quality=95):
    buf = io.BytesIO()
    Image.fromarray(arr_hwc_uint8).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


# ---------------------------------------------------------------- JPEG

def test_jpeg_incompressibility_matches_hand_computation():
    x = _images()
    scores, info = rewards.load("jpeg_incompressibility")(x, ["p"] * 3, None)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and info == {}
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    expected = torch.tensor([_jpeg_kb(a) for a in arr], dtype=torch.float32)
    torch.testing.assert_close(scores, expected, atol=0, rtol=0)


def test_jpeg_flat_smaller_than_noise_and_compressibility_is_negation():
    x = _images()
    inc, _ = rewards.load("jpeg_incompressibility")(x, None, None)
    comp, _ = rewards.load("jpeg_compressibility")(x, None, None)
    assert inc[0] < inc[1] and inc[0] < inc[2]
    assert inc[0] < 1.5 and inc[1] > 2.5  # 48x48: flat ~0.7 kB, noise ~3.3 kB
    torch.testing.assert_close(comp, -inc, atol=0, rtol=0)
    assert rewards.load("jpeg_compressibility").differentiable is False
    with pytest.raises(RewardError, match="not differentiable"):
        rewards.load("jpeg_compressibility").score_tensor(x)


def test_jpeg_accepts_every_image_format_identically():
    x = _images()
    fn = rewards.load("jpeg_incompressibility")
    ref, _ = fn(x, None, None)
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    s_np, _ = fn(arr, None, None)
    s_pil, _ = fn([Image.fromarray(a) for a in arr], None, None)
    s_u8, _ = fn(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), None, None)
    for s in (s_np, s_pil, s_u8):
        torch.testing.assert_close(s, ref, atol=0, rtol=0)


def test_jpeg_quality_option_and_determinism():
    x = _images()
    a, _ = rewards.load("jpeg_incompressibility", quality=50)(x, None, None)
    b, _ = rewards.load("jpeg_incompressibility", quality=50)(x, None, None)
    c, _ = rewards.load("jpeg_incompressibility")(x, None, None)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a[1:] < c[1:]).all()


def test_undecodable_sample_is_nan_not_zero(tmp_path):
    x = _images()
    x[1, 0, 0, 0] = float("nan")
    scores, _ = rewards.load("jpeg_incompressibility")(x, None, None)
    assert math.isnan(scores[1]) and not math.isnan(scores[0]) and not math.isnan(scores[2])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(good)
    scores, _ = rewards.load("jpeg_incompressibility")([str(good), str(bad)], None, None)
    assert scores[0] > 0 and math.isnan(scores[1])


def test_empty_batch_and_bad_layout():
    fn = rewards.load("jpeg_incompressibility")
    s, info = fn(torch.zeros(0, 3, 8, 8), [], None)
    assert s.shape == (0,) and s.dtype == torch.float32
    with pytest.raises(RewardError, match="jpeg_incompressibility.*\\[B, 3, H, W\\]"):
        fn(torch.zeros(2, 8, 8), None, None)
    with pytest.raises(RewardError, match="2 prompts for 3 samples"):
        fn(_images(), ["a", "b"], None)


# ---------------------------------------------------------------- registry

def test_registry_names_and_errors():
    names = rewards.available()
    for n in ["jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "pickscore", "imagereward",
              "hpsv2", "hpsv2.1", "clipscore", "shapes_alignment"]:
        assert n in names
    with pytest.raises(RewardError) as e:
        rewards.load("nope")
    assert "nope" in str(e.value) and "jpeg_compressibility" in str(e.value) and "pickscore" in str(e.value)
    with pytest.raises(RewardError, match=r"no option\(s\) \['qualiti'\].*quality"):
        rewards.load("jpeg_incompressibility", qualiti=3)
    with pytest.raises(RewardError, match="quality must be an integer"):
        rewards.load("jpeg_incompressibility", quality=0)


def test_shapes_alignment_is_lazy(monkeypatch):
    import importlib.util

    from rewards.registry import REGISTRY

    factory = REGISTRY["shapes_alignment"]
    assert factory.module == "rewards.shapes_alignment"
    assert factory.function == "make_shapes_alignment_reward"
    if importlib.util.find_spec("rewards.shapes_alignment") is None:
        with pytest.raises(RewardError, match="rewards.shapes_alignment"):
            rewards.load("shapes_alignment")


def test_lazy_factory_via_fake_module(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("rewards._fake_mod")
    mod.make = lambda **kw: (lambda images, prompts, metadata: [float(kw.get("v", 1))] * len(prompts))
    monkeypatch.setitem(sys.modules, "rewards._fake_mod", mod)
    from rewards.registry import REGISTRY, _Lazy

    monkeypatch.setitem(REGISTRY, "fake", _Lazy("rewards._fake_mod", "make"))
    fn = rewards.load("fake", v=4)
    s, _ = fn(_images(), ["a", "b", "c"], None)
    torch.testing.assert_close(s, torch.full((3,), 4.0))
    assert fn.differentiable is False and fn.name == "fake"


# ---------------------------------------------------------------- check_scores

def test_check_scores_converts():
    for v in ([1, 2.5, None], np.array([1.0, 2.5, np.nan]), torch.tensor([1.0, 2.5, float("nan")])):
        t = check_scores("r", v, 3)
        assert t.dtype == torch.float32 and t.shape == (3,) and t.device.type == "cpu"
        assert t[:2].tolist() == [1.0, 2.5] and math.isnan(t[2])
    torch.testing.assert_close(check_scores("r", torch.ones(3, 1, dtype=torch.float64), 3), torch.ones(3))


@pytest.mark.parametrize(
    "value, pattern",
    [
        ([1.0, 2.0], "returned 2 scores for 3 samples"),
        (torch.ones(3, 2), r"shape \(3, 2\)"),
        ([1.0, float("inf"), 0.0], r"infinite scores at indices \[1\]"),
        (np.array([1.0, -np.inf, 0.0]), "infinite"),
        (3.0, "single number"),
        (["a", "b", "c"], "non-numeric"),
        ("abc", "str"),
    ],
)
def test_check_scores_errors_name_reward_and_batch(value, pattern):
    with pytest.raises(RewardError, match=pattern) as e:
        check_scores("my_reward", value, 3)
    assert "'my_reward'" in str(e.value) and "batch size 3" in str(e.value)


# ---------------------------------------------------------------- failure semantics

def test_raising_reward_becomes_reward_error_chained():
    def boom(images, prompts, metadata):
        raise ValueError("kaput")

    fn = CallableReward("boom", boom)
    with pytest.raises(RewardError) as e:
        fn(_images(), None, None)
    assert "'boom'" in str(e.value) and "batch of 3" in str(e.value) and "kaput" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


def test_callable_reward_output_validated():
    fn = CallableReward("short", lambda i, p, m: [1.0])
    with pytest.raises(RewardError, match="'short'.*returned 1 scores for 3 samples"):
        fn(_images(), None, None)
    fn = CallableReward("info", lambda i, p, m: ([1, 2, 3], {"k": 1}))
    s, info = fn(_images(), None, None)
    assert s.tolist() == [1.0, 2.0, 3.0] and info == {"k": 1}


class _TextLength(RewardFn):
    """A text reward on the shared base: characters per sample; empty text is unscorable (NaN)."""

    name = "text_length"

    def _score(self, samples, prompts, metadata):
        if isinstance(samples, torch.Tensor):  # token ids [B, L], 0 = padding
            return (samples != 0).sum(dim=1).float(), {"kind": "tokens"}
        return [float(len(t)) if t else float("nan") for t in samples], {"kind": "text"}


def test_text_reward_subclass_scores_strings_through_check_scores():
    fn = _TextLength()
    texts = ["a red circle", "", "two blue squares"]
    scores, info = fn(texts, ["p"] * 3, None)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and info == {"kind": "text"}
    assert scores[0] == 12.0 and math.isnan(scores[1]) and scores[2] == 16.0
    raw, _ = fn._score(texts, ["p"] * 3, None)
    torch.testing.assert_close(check_scores("text_length", raw, 3), scores, atol=0, rtol=0, equal_nan=True)
    # a non-image tensor batch (token ids [B, L]) is counted by its first dimension, not rejected as a bad image
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    s_ids, info_ids = fn(ids, "a prompt", None)
    assert s_ids.tolist() == [2.0, 1.0] and info_ids == {"kind": "tokens"}
    s_kw, _ = fn(samples=texts, prompts=None, metadata=None)
    torch.testing.assert_close(s_kw, scores, atol=0, rtol=0, equal_nan=True)
    with pytest.raises(RewardError, match="2 prompts for 3 samples"):
        fn(texts, ["a", "b"], None)
    with pytest.raises(RewardError, match="'text_length': cannot read the batch.*single str"):
        fn("just one string", None, None)
    with pytest.raises(RewardError, match=r"returned 2 scores for 3 samples.*one score per sample"):
        check_scores("text_length", [1.0, 2.0], 3)
    with rewards.AsyncScorer(fn) as scorer:
        torch.testing.assert_close(scorer.submit(texts).result()[0], scores, atol=0, rtol=0, equal_nan=True)


def test_callable_reward_keeps_the_image_signature():
    seen = {}

    def brightness(images, prompts, metadata):
        seen.update(shape=tuple(images.shape), prompts=prompts, metadata=metadata)
        return images.mean(dim=(1, 2, 3)), {}

    fn = CallableReward("brightness", brightness)
    x = _images()
    s, info = fn(x, "p", [{"i": 0}, {"i": 1}, {"i": 2}])  # positional, as the trainer calls it
    torch.testing.assert_close(s, x.mean(dim=(1, 2, 3)), atol=0, rtol=0)
    assert seen == {"shape": (3, 3, 48, 48), "prompts": ["p"] * 3, "metadata": [{"i": 0}, {"i": 1}, {"i": 2}]}
    torch.testing.assert_close(fn(images=x, prompts=None)[0], s, atol=0, rtol=0)  # the old keyword name
    with pytest.raises(TypeError, match="not also as `images`"):
        fn(x, images=x)
    # image validation lives in the image rewards
    assert isinstance(rewards.load("jpeg_incompressibility"), rewards.ImageRewardFn)
    assert not isinstance(fn, rewards.ImageRewardFn) and not isinstance(_TextLength(), rewards.ImageRewardFn)
    with pytest.raises(RewardError, match=r"cannot read the image batch.*\[B, 3, H, W\]"):
        rewards.load("jpeg_incompressibility")(torch.zeros(2, 8, 8), None, None)


# ---------------------------------------------------------------- multi

class _Const(RewardFn):
    differentiable = True

    def __init__(self, name, scale):
        self.name, self.scale = name, scale

    def _score(self, images, prompts, metadata):
        return self.score_tensor(rewards.to_float_tensor(images), prompts).detach(), {"seen": len(prompts)}

    def score_tensor(self, images, prompts=None):
        return self.scale * images.mean(dim=(1, 2, 3))


def test_load_multi_weighted_sum_and_components():
    x = _images()
    m = rewards.load_multi(
        [{"name": "jpeg_incompressibility", "weight": 2.0},
         {"name": "jpeg_compressibility", "weight": 0.5, "label": "comp", "quality": 80}],
        mode="advantage",
    )
    assert m.weights == {"jpeg_incompressibility": 2.0, "comp": 0.5}
    s, info = m(x, ["p"] * 3, None)
    inc, _ = rewards.load("jpeg_incompressibility")(x, None, None)
    comp, _ = rewards.load("jpeg_compressibility", quality=80)(x, None, None)
    torch.testing.assert_close(info["components"]["jpeg_incompressibility"], inc, atol=0, rtol=0)
    torch.testing.assert_close(info["components"]["comp"], comp, atol=0, rtol=0)
    torch.testing.assert_close(s, 2.0 * inc + 0.5 * comp, atol=1e-6, rtol=0)
    assert m.differentiable is False


def test_load_multi_mode_is_validated_but_does_not_change_the_reward():
    """The combination mode is the trainer's business (it reads .weights in advantage mode); the reward is the same."""
    x = _images()
    specs = [{"name": "jpeg_incompressibility", "weight": 2.0}, {"name": "jpeg_compressibility", "weight": 0.5}]
    out = {mode: rewards.load_multi(specs, mode=mode) for mode in ("sum", "advantage")}
    (s_sum, i_sum), (s_adv, i_adv) = (out[m](x, None, None) for m in ("sum", "advantage"))
    torch.testing.assert_close(s_sum, s_adv, atol=0, rtol=0)
    assert i_sum.keys() == i_adv.keys() == {"components", "weights"}
    assert out["sum"].weights == out["advantage"].weights == {"jpeg_incompressibility": 2.0, "jpeg_compressibility": 0.5}
    assert not hasattr(out["advantage"], "mode")
    with pytest.raises(TypeError):
        MultiReward({"a": _Const("a", 1.0)}, {"a": 1.0}, mode="sum")


def test_load_multi_errors():
    with pytest.raises(RewardError, match="used twice"):
        rewards.load_multi([{"name": "jpeg_compressibility"}, {"name": "jpeg_compressibility"}])
    with pytest.raises(RewardError, match="mode"):
        rewards.load_multi([{"name": "jpeg_compressibility"}], mode="max")
    with pytest.raises(RewardError, match="unknown reward"):
        rewards.load_multi([{"name": "nah"}])
    with pytest.raises(RewardError, match="weight"):
        rewards.load_multi([{"name": "jpeg_compressibility", "weight": float("nan")}])


def test_multi_nan_propagates_and_differentiable_sum():
    x = _images()
    x[2, 0, 0, 0] = float("nan")
    m = MultiReward({"a": _Const("a", 1.0), "j": rewards.load("jpeg_incompressibility")}, {"a": 1.0, "j": 1.0})
    s, info = m(x, None, None)
    assert math.isnan(s[2]) and math.isnan(info["components"]["j"][2]) and not math.isnan(s[0])
    m2 = MultiReward({"a": _Const("a", 1.0), "b": _Const("b", 3.0)}, {"a": 2.0, "b": -1.0})
    assert m2.differentiable
    y = _images().requires_grad_()
    out = m2.score_tensor(y)
    torch.testing.assert_close(out, (2.0 - 3.0) * y.mean(dim=(1, 2, 3)))
    out.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


# ---------------------------------------------------------------- AsyncScorer

class _Slow(RewardFn):
    name = "slow"

    def __init__(self):
        self.threads = []

    def _score(self, images, prompts, metadata):
        self.threads.append(threading.current_thread().name)
        x = rewards.to_float_tensor(images)
        return (x.flatten(1) @ torch.arange(x[0].numel(), dtype=torch.float32)) / x[0].numel(), {}


def test_async_scorer_matches_sync():
    fn = _Slow()
    batches = [_images(seed=s) for s in range(4)]
    sync = [fn(b, None, None)[0] for b in batches]
    with rewards.AsyncScorer(fn) as scorer:
        futures = []
        for b in batches:
            futures.append(scorer.submit(b, ["p"] * 3, None))
            b.zero_()  # the caller reuses its buffer; the snapshot must be scored
        results = [f.result()[0] for f in futures]
    for a, b in zip(sync, results, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any(t.startswith("reward") for t in fn.threads)
    with pytest.raises(RewardError, match="closed"):
        scorer.submit(batches[0])


def test_async_scorer_jpeg_and_error_propagation():
    fn = rewards.load("jpeg_incompressibility")
    x = _images()
    with rewards.AsyncScorer(fn) as scorer:
        torch.testing.assert_close(scorer.submit(x).result()[0], fn(x, None, None)[0], atol=0, rtol=0)
        fut = scorer.submit(torch.zeros(2, 3, 8, 8), ["a"] * 5)
        with pytest.raises(RewardError, match="5 prompts for 2 samples"):
            fut.result()
