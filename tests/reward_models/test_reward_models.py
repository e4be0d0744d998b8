"""Model rewards on tiny random models saved in the published formats, checked against independent
computations written directly against transformers / open_clip."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import rewards
from rewards import RewardError

PROMPTS = ["a red cube", "two blue spheres on a table", "a photo of a green cat"]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _images(n=3, h=40, w=52, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _pils(x):
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _mlp(sd, x):
    for i in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x.squeeze(-1)


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def aesthetic(tiny_clip_dir, aesthetic_head_dir):
    return rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(aesthetic_head_dir))


@pytest.fixture(scope="module")
def pickscore(tiny_clip_dir):
    return rewards.load("pickscore", model_path=str(tiny_clip_dir), processor_path=str(tiny_clip_dir))


@pytest.fixture(scope="module")
def hps(tiny_hps):
    return rewards.load("hpsv2", model_path=str(tiny_hps["dir"]), model_config=str(tiny_hps["config"]))


@pytest.fixture(scope="module")
def imagereward(tiny_imagereward):
    t = tiny_imagereward
    return rewards.load("imagereward", model_path=str(t["dir"]), tokenizer_path=str(t["tokenizer"]),
                        blip_config=t["config"])


# ---------------------------------------------------------------- constants

def test_reference_constants():
    from rewards import aesthetic as aes
    from rewards import hps, imagereward, images, pickscore

    assert images.OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert images.OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert imagereward.MEAN == 0.16717362830052426 and imagereward.STD == 1.0333394966054072
    assert imagereward.MAX_LENGTH == 35 and imagereward.CHECKPOINT == "ImageReward.pt"
    v, t = imagereward.REAL_BLIP_CONFIG["vision_config"], imagereward.REAL_BLIP_CONFIG["text_config"]
    assert (v["hidden_size"], v["num_hidden_layers"], v["patch_size"], v["image_size"], v["layer_norm_eps"]) == (
        1024, 24, 16, 224, 1e-6)
    assert (t["vocab_size"], t["hidden_size"], t["encoder_hidden_size"], t["layer_norm_eps"]) == (30524, 768, 1024, 1e-12)
    assert hps.FILENAMES == {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
    assert hps.DEFAULT_REPO == "xswu/HPSv2" and hps.DEFAULT_MODEL_NAME == "ViT-H-14"
    assert (aes.DEFAULT_CLIP, aes.DEFAULT_HEAD, aes.HEAD_FILENAME) == (
        "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
    assert (pickscore.DEFAULT_MODEL, pickscore.DEFAULT_PROCESSOR) == (
        "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def test_tensor_preprocess_matches_clip_processor_at_realistic_size():
    from transformers import CLIPImageProcessor

    from rewards.clip_models import TensorPreprocess

    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    tp = TensorPreprocess.from_image_processor(ip)
    assert (tp.size, tp.crop) == (224, (224, 224))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 320), torch.linspace(0, 1, 384), indexing="ij")
    x = torch.stack([yy, xx, (yy + xx) / 2])[None]  # smooth image, 320x384 -> 224
    ref = ip(images=_pils(x), return_tensors="pt")["pixel_values"]
    got = tp(x)
    assert got.shape == ref.shape == (1, 3, 224, 224)
    assert (got - ref).abs().max() < 0.03


# ---------------------------------------------------------------- aesthetic

def test_aesthetic_matches_independent_computation(aesthetic, tiny_clip_dir, aesthetic_head_dir):
    from transformers import CLIPModel, CLIPProcessor

    x = _images()
    scores, info = aesthetic(x, PROMPTS, None)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip_dir)
    sd = torch.load(aesthetic_head_dir / "aesthetic-model.pth", weights_only=True)
    with torch.no_grad():
        e = _feat(model.get_image_features(**proc(images=_pils(x), return_tensors="pt")))
        expected = _mlp(sd, _unit(e))
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.dtype == torch.float32 and info == {} and aesthetic.differentiable
    assert scores.std() > 1e-4  # images are distinguished


def test_aesthetic_batching_determinism_dtype(aesthetic, tiny_clip_dir, aesthetic_head_dir):
    x = _images(n=5, seed=1)
    full, _ = aesthetic(x, None, None)
    again, _ = aesthetic(x, None, None)
    torch.testing.assert_close(full, again, atol=0, rtol=0)
    one = torch.cat([aesthetic(x[i : i + 1], None, None)[0] for i in range(5)])
    torch.testing.assert_close(full, one, atol=1e-5, rtol=0)
    chunked = rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(aesthetic_head_dir), batch_size=2)
    torch.testing.assert_close(chunked(x, None, None)[0], full, atol=1e-5, rtol=0)
    f64 = rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(aesthetic_head_dir), dtype="float64")
    assert f64.clip.dtype == torch.float64
    s64, _ = f64(x, None, None)
    assert s64.dtype == torch.float32
    torch.testing.assert_close(s64, full, atol=1e-4, rtol=0)
    bf = rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(aesthetic_head_dir), dtype="bf16")
    assert bf.clip.dtype == torch.bfloat16 and torch.isfinite(bf(x, None, None)[0]).all()


def test_aesthetic_head_errors(tiny_clip_dir, tmp_path):
    sd = {f"layers.{i}.weight": torch.zeros(1, 1) for i in (0, 2, 4)}
    torch.save(sd, tmp_path / "aesthetic-model.pth")
    with pytest.raises(RewardError, match="aesthetic.*missing"):
        rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(tmp_path))
    with pytest.raises(RewardError, match="has no file 'aesthetic-model.pth'"):
        rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(tmp_path / ".."))


# ---------------------------------------------------------------- pickscore / clipscore

def _clip_cos(model_dir, x, texts):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPProcessor.from_pretrained(model_dir)
    inputs = proc(text=texts, images=_pils(x), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        i = _unit(_feat(model.get_image_features(pixel_values=inputs["pixel_values"])))
        t = _unit(_feat(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])))
    return (i * t).sum(-1), model.logit_scale.exp().item()


def test_pickscore_matches_independent_computation(pickscore, tiny_clip_dir):
    x = _images()
    scores, _ = pickscore(x, PROMPTS, None)
    cos, scale = _clip_cos(tiny_clip_dir, x, PROMPTS)
    assert scale == pytest.approx(100.0, rel=1e-5)
    torch.testing.assert_close(scores, scale * cos, atol=1e-5, rtol=1e-6)
    # per-pair diagonal: permuting pairs permutes scores; a single prompt is broadcast
    perm = [2, 0, 1]
    torch.testing.assert_close(pickscore(x[perm], [PROMPTS[i] for i in perm], None)[0], scores[perm], atol=1e-5, rtol=0)
    bcast, _ = pickscore(x, "a red cube", None)
    torch.testing.assert_close(bcast[0], scores[0], atol=1e-5, rtol=0)
    assert not torch.allclose(bcast[1:], scores[1:])


def test_clipscore_formula_and_options(tiny_clip_dir):
    x = _images(n=4, seed=3)
    texts = PROMPTS + ["a dog"]
    cos, _ = _clip_cos(tiny_clip_dir, x, texts)
    paper = rewards.load("clipscore", model_path=str(tiny_clip_dir))
    torch.testing.assert_close(paper(x, texts, None)[0], 2.5 * cos.clamp(min=0), atol=1e-5, rtol=0)
    raw = rewards.load("clipscore", model_path=str(tiny_clip_dir), w=100, clamp=False)
    torch.testing.assert_close(raw(x, texts, None)[0], 100 * cos, atol=1e-4, rtol=0)
    pre = rewards.load("clipscore", model_path=str(tiny_clip_dir), clamp=False, prefix="A photo depicts ")
    cos_pre, _ = _clip_cos(tiny_clip_dir, x, ["A photo depicts " + t for t in texts])
    torch.testing.assert_close(pre(x, texts, None)[0], 2.5 * cos_pre, atol=1e-5, rtol=0)
    assert (cos < 0).any() or (cos > 0).all()
    with pytest.raises(RewardError, match="finite number"):
        rewards.load("clipscore", model_path=str(tiny_clip_dir), w=float("inf"))


def _clip_only_dir(src, dst):
    """A copy of a CLIP directory with the weights only (no processor or tokenizer files)."""
    import shutil

    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, dst / f)
    return dst


def test_pickscore_local_model_directory_uses_its_processor_offline(tiny_clip_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fn = rewards.load("pickscore", model_path=str(tiny_clip_dir))  # no processor_path: the directory's own
    assert fn.preprocess.size == 32 and fn.preprocess.crop == (32, 32)  # not the laion processor's 224
    x = _images()
    scores, _ = fn(x, PROMPTS, None)
    cos, scale = _clip_cos(tiny_clip_dir, x, PROMPTS)
    torch.testing.assert_close(scores, 100.0 * cos, atol=1e-5, rtol=1e-6)
    assert scale == pytest.approx(100.0, rel=1e-6)
    # a directory without a processor keeps the hub default, which cannot be fetched offline
    bare = _clip_only_dir(tiny_clip_dir, tmp_path / "weights_only")
    with pytest.raises(RewardError, match=r"processor from 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'.*processor_path"):
        rewards.load("pickscore", model_path=str(bare))
    # an explicit processor_path still wins
    explicit = rewards.load("pickscore", model_path=str(bare), processor_path=str(tiny_clip_dir))
    torch.testing.assert_close(explicit(x, PROMPTS, None)[0], scores, atol=0, rtol=0)


def test_pickscore_bf16_keeps_logit_scale_in_fp32(tiny_clip_dir, pickscore):
    from transformers import CLIPModel, CLIPProcessor

    bf = rewards.load("pickscore", model_path=str(tiny_clip_dir), processor_path=str(tiny_clip_dir), dtype="bf16")
    x = _images()
    scores, _ = bf(x, PROMPTS, None)
    # independent bf16 computation: same bf16 weights, fp32 pixels cast once, scale exactly exp(fp32 ln 100) = 100
    model = CLIPModel.from_pretrained(tiny_clip_dir, dtype=torch.bfloat16).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = proc(text=PROMPTS, images=_pils(x), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        i = _unit(_feat(model.get_image_features(pixel_values=inputs["pixel_values"].to(torch.bfloat16))).float())
        t = _unit(_feat(model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"])).float())
    cos_bf16 = (i * t).sum(-1)
    torch.testing.assert_close(scores, 100.0 * cos_bf16, atol=1e-4, rtol=1e-5)  # a bf16 scale gives 98.9 * cos
    # and close to the fp32 reward: bf16 weights and activations only (|cos error| ~ 1e-2)
    ref, _ = pickscore(x, PROMPTS, None)
    assert (scores - ref).abs().max() < 1.0
    assert bf.model.dtype == torch.bfloat16 and bf.model.logit_scale.dtype == torch.bfloat16
    assert math.exp(bf.model.logit_scale.item()) < 98.9  # what the bf16 parameter holds: exp(4.59375)
    assert bf.logit_scale.dtype == torch.float32
    assert bf.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)


def _vision_module(fn):
    if hasattr(fn, "clip"):  # aesthetic: CLIPVisionModelWithProjection
        return fn.clip.vision_model
    model = fn.model
    return getattr(model, "visual", None) or model.vision_model  # open_clip (HPS) / CLIP / BLIP


def _pixels_into_model(fn, call):
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["pixel_values"]).detach().clone())

    handle = _vision_module(fn).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _load_model_reward(which, dtype, tiny_clip_dir, aesthetic_head_dir, tiny_hps, tiny_imagereward):
    if which == "aesthetic":
        return rewards.load("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(aesthetic_head_dir), dtype=dtype)
    if which in ("pickscore", "clipscore"):
        return rewards.load(which, model_path=str(tiny_clip_dir), processor_path=str(tiny_clip_dir), dtype=dtype)
    if which == "hps":
        return rewards.load("hpsv2", model_path=str(tiny_hps["dir"]), model_config=str(tiny_hps["config"]), dtype=dtype)
    t = tiny_imagereward
    return rewards.load("imagereward", model_path=str(t["dir"]), tokenizer_path=str(t["tokenizer"]),
                        blip_config=t["config"], dtype=dtype)


@pytest.mark.parametrize("which", ["aesthetic", "pickscore", "clipscore", "hps", "imagereward"])
def test_reduced_precision_rewards_preprocess_in_fp32(which, tiny_clip_dir, aesthetic_head_dir, tiny_hps,
                                                      tiny_imagereward):
    """The pixels a bf16 model receives are the fp32 preprocessing rounded once to bf16, on both paths."""
    kw = dict(tiny_clip_dir=tiny_clip_dir, aesthetic_head_dir=aesthetic_head_dir, tiny_hps=tiny_hps,
              tiny_imagereward=tiny_imagereward)
    f32 = _load_model_reward(which, None, **kw)
    bf = _load_model_reward(which, "bf16", **kw)
    x = _images(n=2, h=40, w=52, seed=21)
    y = x.clone().requires_grad_()
    px32 = _pixels_into_model(f32, lambda: f32.score_tensor(x, PROMPTS[:2]))
    pxbf = _pixels_into_model(bf, lambda: bf.score_tensor(y, PROMPTS[:2]).sum().backward())
    assert px32.dtype == torch.float32 and pxbf.dtype == torch.bfloat16
    assert torch.equal(pxbf, px32.to(torch.bfloat16))
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    call32 = _pixels_into_model(f32, lambda: f32(x, PROMPTS[:2], None))
    callbf = _pixels_into_model(bf, lambda: bf(x, PROMPTS[:2], None))
    assert torch.equal(callbf, call32.to(torch.bfloat16))


# ---------------------------------------------------------------- HPS

def _resize_max_size_reference(img, size, antialias):
    """open_clip ``ResizeMaxSize(size, fill=0)`` as hpsv2's eval transform applies it (after ToTensor), written
    from upstream's steps with torchvision's v1 functional API: scale the longest side to ``size`` with
    Python rounding, bicubic, then pad [left, top, right, bottom] = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]
    with 0. ``img``: float [3, H, W]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F1

    height, width = img.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = F1.resize(img, list(new_size), InterpolationMode.BICUBIC, antialias=antialias)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        img = F1.pad(img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return img


def _hps_transform(antialias=False, size=32):
    """hpsv2 ``image_transform(is_train=False, resize_longest_max=True)``: ToTensor, ResizeMaxSize, Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Lambda(lambda t: _resize_max_size_reference(t, size, antialias)),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def _hps_expected(tiny_hps, fname, x, texts, antialias=False):
    import open_clip

    model = open_clip.create_model(tiny_hps["name"], pretrained=None, output_dict=True).eval()
    model.load_state_dict(torch.load(tiny_hps["dir"] / fname, weights_only=True)["state_dict"])
    tf = _hps_transform(antialias)
    images = torch.stack([tf(p) for p in _pils(x)])
    tokens = open_clip.get_tokenizer(tiny_hps["name"])(texts)
    with torch.no_grad():
        out = model(images, tokens)
    return (out["image_features"] * out["text_features"]).sum(-1)


def test_hpsv2_matches_independent_computation(hps, tiny_hps):
    x = _images()
    scores, _ = hps(x, PROMPTS, None)
    torch.testing.assert_close(scores, _hps_expected(tiny_hps, "HPS_v2_compressed.pt", x, PROMPTS), atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1.0  # cosine, no logit scale
    v21 = rewards.load("hpsv2.1", model_path=str(tiny_hps["dir"]), model_config=str(tiny_hps["config"]))
    s21, _ = v21(x, PROMPTS, None)
    torch.testing.assert_close(s21, _hps_expected(tiny_hps, "HPS_v2.1_compressed.pt", x, PROMPTS), atol=1e-5, rtol=0)
    assert v21.name == "hpsv2.1" and not torch.allclose(s21, scores)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("hw", [(40, 52), (52, 40), (31, 64), (20, 33), (12, 20)])
def test_hps_letterbox_matches_upstream_resize_max_size(tiny_hps, hw, antialias):
    """Non-square images: longest side to 32, black padding centred (odd pixel right/bottom), no crop."""
    options = {"antialias": True} if antialias else {}  # antialias=False is the default
    fn = rewards.load("hpsv2", model_path=str(tiny_hps["dir"]), model_config=str(tiny_hps["config"]), **options)
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.rand(2, 3, *hw, generator=g)
    got = fn._preprocess(x)
    ref = torch.stack([_hps_transform(antialias)(p) for p in _pils(x)])  # upstream order: ToTensor first
    x8 = (x * 255).round() / 255  # the 8-bit rendering the PIL path scores
    assert got.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(fn._preprocess(x8), ref, atol=1e-5, rtol=0)
    # the padding is black (0 before normalisation) and nothing of the image is cropped away
    black = (-torch.tensor(OPENAI_MEAN) / torch.tensor(OPENAI_STD)).view(3, 1, 1)
    h, w = hw
    nh, nw = round(h * 32 / max(h, w)), round(w * 32 / max(h, w))
    top, left = (32 - nh) // 2, (32 - nw) // 2
    pad = torch.ones(32, 32, dtype=torch.bool)
    pad[top:top + nh, left:left + nw] = False
    assert pad.sum() == 32 * 32 - nh * nw > 0
    torch.testing.assert_close(got[:, :, pad], black.expand(2, 3, 32, 32)[:, :, pad], atol=1e-6, rtol=0)
    if antialias:  # PIL: bicubic resize of the longest side, pasted on a black canvas (antialiased, 8-bit)
        xm = 0.3 + 0.4 * x8  # mid-range pixels: no overshoot for PIL to clip
        canvas = []
        for im in _pils(xm):
            c = Image.new("RGB", (32, 32), (0, 0, 0))
            c.paste(im.resize((nw, nh), Image.BICUBIC), (left, top))
            canvas.append(torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1).float() / 255)
        pil_ref = (torch.stack(canvas) - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
        assert (fn._preprocess(xm) - pil_ref).abs().max() < 0.03  # 1-2 uint8 levels; a 1-px shift gives ~0.6
    # both scoring paths letterbox identically: tensor path == PIL path for 8-bit-exact input
    s_tensor = fn.score_tensor(x8, PROMPTS[:2]).detach()
    s_call, _ = fn(x8, PROMPTS[:2], None)
    torch.testing.assert_close(s_tensor, s_call, atol=1e-6, rtol=0)
    torch.testing.assert_close(s_call, _hps_expected(tiny_hps, "HPS_v2_compressed.pt", x8, PROMPTS[:2], antialias),
                               atol=1e-5, rtol=0)


def test_hps_letterbox_is_differentiable_and_square_images_unchanged(tiny_hps, hps):
    from rewards.images import resize_center_crop_normalize, resize_longest_pad_normalize

    assert hps.antialias is False  # default: upstream's training-time torchvision did not antialias tensors
    y = _images(n=2, h=40, w=52, seed=5).requires_grad_()
    s = hps.score_tensor(y, PROMPTS[:2])
    s.sum().backward()
    assert torch.isfinite(y.grad).all() and (y.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    # square images: letterbox == the previous resize + center crop, bit for bit, under either antialias setting
    for size in (64, 32, 45):
        x = _images(n=2, h=size, w=size, seed=size)
        for aa in (True, False):
            new = resize_longest_pad_normalize(x, 32, OPENAI_MEAN, OPENAI_STD, antialias=aa)
            if aa:  # the old drl helper (always antialiased)
                old = resize_center_crop_normalize(x, 32, 32, OPENAI_MEAN, OPENAI_STD)
                assert torch.equal(new, old)
            from torchvision import transforms as T
            crop = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=aa), T.CenterCrop(32),
                              T.Normalize(OPENAI_MEAN, OPENAI_STD)])
            torch.testing.assert_close(new, torch.stack([crop(im) for im in x]), atol=1e-6, rtol=0)
    # longest side already 32 but not square: upstream would skip the padding (and the model would fail); drl pads
    x = _images(n=1, h=20, w=32, seed=6)
    out = resize_longest_pad_normalize(x, 32, OPENAI_MEAN, OPENAI_STD, antialias=False)
    m, sd = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out[:, :, 6:26], (x - m) / sd, atol=0, rtol=0)
    torch.testing.assert_close(out[:, :, :6], (-m / sd).expand(1, 3, 6, 32), atol=1e-6, rtol=0)
    aa = rewards.load("hpsv2", model_path=str(tiny_hps["dir"]), model_config=str(tiny_hps["config"]), antialias=True)
    x = _images(n=3, h=64, w=64, seed=8)
    torch.testing.assert_close(aa(x, PROMPTS, None)[0], _hps_expected(tiny_hps, "HPS_v2_compressed.pt", x, PROMPTS, True),
                               atol=1e-5, rtol=0)
    with pytest.raises(RewardError, match="antialias must be true or false"):
        rewards.load("hpsv2", model_path=str(tiny_hps["dir"]), model_config=str(tiny_hps["config"]), antialias="yes")


def test_hps_checkpoint_mismatch_is_reported(tiny_hps, tmp_path):
    sd = dict(tiny_hps["states"]["HPS_v2_compressed.pt"])
    sd.pop("logit_scale")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(RewardError, match=r"missing \['logit_scale'\].*unexpected \['extra.weight'\]"):
        rewards.load("hpsv2", model_path=str(tmp_path), model_config=str(tiny_hps["config"]))


# ---------------------------------------------------------------- ImageReward

def test_imagereward_key_conversion_round_trips(tiny_imagereward):
    from rewards.imagereward import convert_imagereward_state_dict

    blip, head, leftovers = convert_imagereward_state_dict(tiny_imagereward["checkpoint"])
    assert leftovers == []
    assert set(blip) == set(tiny_imagereward["blip_sd"])
    assert all(torch.equal(blip[k], v) for k, v in tiny_imagereward["blip_sd"].items())
    assert set(head) == set(tiny_imagereward["head_sd"])
    assert "blip.visual_encoder.blocks.1.attn.proj.weight" in tiny_imagereward["checkpoint"]


def test_imagereward_matches_independent_computation(imagereward, tiny_imagereward):
    from torchvision import transforms as T
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    t = tiny_imagereward
    x = _images()
    scores, _ = imagereward(x, PROMPTS, None)
    model = BlipForImageTextRetrieval(BlipConfig(**t["config"])).eval()
    model.load_state_dict(t["blip_sd"], strict=False)
    tok = BertTokenizer.from_pretrained(t["tokenizer"])
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert len(tok) == len(imagereward.tokenizer)
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    px = torch.stack([tf(p) for p in _pils(x)])
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert ids["input_ids"].shape == (3, 35) and (ids["input_ids"][:, 0] == tok.cls_token_id).all()
    with torch.no_grad():
        img = model.vision_model(pixel_values=px).last_hidden_state
        h = model.text_encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                               encoder_hidden_states=img,
                               encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        expected = (_mlp(t["head_sd"], h) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.std() > 1e-5


def test_imagereward_rejects_leftover_and_missing_keys(tiny_imagereward, tmp_path):
    t = tiny_imagereward
    kw = dict(tokenizer_path=str(t["tokenizer"]), blip_config=t["config"])
    extra = dict(t["checkpoint"], **{"blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(32), "temp": torch.zeros(1)})
    (tmp_path / "a").mkdir()
    torch.save(extra, tmp_path / "a" / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"2 checkpoint keys.*(ls1.gamma|temp)"):
        rewards.load("imagereward", model_path=str(tmp_path / "a"), **kw)
    missing = {k: v for k, v in t["checkpoint"].items() if "blocks.1.mlp.fc2" not in k}
    (tmp_path / "b").mkdir()
    torch.save(missing, tmp_path / "b" / "ImageReward.pt")
    with pytest.raises(RewardError, match=r"missing \['vision_model.encoder.layers.1.mlp.fc2"):
        rewards.load("imagereward", model_path=str(tmp_path / "b"), **kw)


# ---------------------------------------------------------------- shared model behaviour

@pytest.mark.parametrize("which", ["aesthetic", "pickscore", "hps", "imagereward"])
def test_differentiable_gradients_and_tensor_path(which, request):
    fn = request.getfixturevalue(which)
    x = _images(n=2, h=64, w=64, seed=7)
    y = x.clone().requires_grad_()
    s = fn.score_tensor(y, PROMPTS[:2])
    assert s.shape == (2,) and s.dtype == torch.float32
    s.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # tensor path and processor path agree approximately (64 -> 32 downscale)
    ref, _ = fn(x, PROMPTS[:2], None)
    scale = ref.abs().max().item() + 1e-3
    assert (s.detach() - ref).abs().max().item() < 0.1 * scale


@pytest.mark.parametrize("which", ["aesthetic", "pickscore", "hps", "imagereward"])
def test_model_reward_formats_and_nan_sample(which, request):
    fn = request.getfixturevalue(which)
    x = _images(n=3, seed=9)
    ref, _ = fn(x, PROMPTS, None)
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(fn(arr, PROMPTS, None)[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(fn(_pils(x), PROMPTS, None)[0], ref, atol=1e-5, rtol=0)
    bad = x.clone()
    bad[1, :, 3, 3] = float("nan")
    s, _ = fn(bad, PROMPTS, None)
    assert math.isnan(s[1]) and not math.isnan(s[0]) and not math.isnan(s[2])
    torch.testing.assert_close(s[[0, 2]], ref[[0, 2]], atol=1e-5, rtol=0)


def test_multi_with_model_rewards(aesthetic, pickscore):
    from rewards.multi import MultiReward

    x = _images(n=2, seed=11)
    m = MultiReward({"aes": aesthetic, "pick": pickscore}, {"aes": 1.0, "pick": 0.01})
    s, info = m(x, PROMPTS[:2], None)
    a, p = aesthetic(x, PROMPTS[:2], None)[0], pickscore(x, PROMPTS[:2], None)[0]
    torch.testing.assert_close(s, a + 0.01 * p, atol=1e-5, rtol=0)
    assert m.differentiable
    y = x.clone().requires_grad_()
    m.score_tensor(y, PROMPTS[:2]).sum().backward()
    assert y.grad.abs().sum() > 0
    with rewards.AsyncScorer(pickscore) as scorer:
        torch.testing.assert_close(scorer.submit(x, PROMPTS[:2]).result()[0], p, atol=0, rtol=0)


# ---------------------------------------------------------------- resolve, safety, CLI

def test_resolve(tmp_path, aesthetic_head_dir):
    f = aesthetic_head_dir / "aesthetic-model.pth"
    assert rewards.resolve(f, "ignored.pth") == str(f)
    assert rewards.resolve(aesthetic_head_dir, "aesthetic-model.pth") == str(f)
    assert rewards.resolve(aesthetic_head_dir) == str(aesthetic_head_dir)
    assert rewards.resolve("org/model") == "org/model"
    with pytest.raises(RewardError, match="has no file 'x.pt'"):
        rewards.resolve(tmp_path, "x.pt")
    with pytest.raises(RewardError, match="could not fetch 'x.pt'.*no-such-org/no-such-repo.*model_path"):
        rewards.resolve("no-such-org/no-such-repo", "x.pt", local_files_only=True)


def test_no_unsafe_loading_in_rewards():
    root = Path(rewards.__file__).parent
    for py in root.glob("*.py"):
        text = py.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), (py.name, m.group(0))
        assert "trust_remote_code=True" not in text, py.name
        assert ".cuda()" not in text, py.name


def test_cli_score_with_tiny_local_model(tiny_clip_dir, pickscore, tmp_path):
    from rewards.cli import app

    paths = []
    for i, p in enumerate(_pils(_images(n=2, seed=13))):
        paths.append(tmp_path / f"{i}.png")
        p.save(paths[-1])
    res = CliRunner().invoke(app, ["score", "--reward", "pickscore", "--model-path", str(tiny_clip_dir),
                                   "--option", f"processor_path={tiny_clip_dir}", "--prompt", PROMPTS[0],
                                   *map(str, paths), "--json"])
    assert res.exit_code == 0, res.output
    got = [r["score"] for r in json.loads(res.stdout)["results"]]
    expected, _ = pickscore([Image.open(p) for p in paths], PROMPTS[0], None)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
