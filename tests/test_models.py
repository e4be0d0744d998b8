"""Model loading (local directory, built-ins, errors), attention backend, trained-weight saving."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusion_rl.models import (
    ModelLoadError,
    build_tiny_pipeline,
    load_pipeline,
    prepare_trainable_denoiser,
    save_trained_weights,
    set_attention_backend,
)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(seed=3).save_pretrained(path, safe_serialization=True)
    return path


def test_local_directory_loads_through_from_pretrained_offline(saved_tiny):
    pipe = load_pipeline(str(saved_tiny), dtype="bfloat16", local_files_only=True)
    ref = build_tiny_pipeline(seed=3)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.unet.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), ref.unet.state_dict().items(), strict=True):
        torch.testing.assert_close(a.float(), b.to(torch.bfloat16).float(), msg=name)


def test_builtin_tiny_random_is_deterministic():
    a, b = load_pipeline("builtin:tiny-random", seed=5), load_pipeline("builtin:tiny-random", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters(), strict=True))
    assert not torch.equal(next(load_pipeline("builtin:tiny-random", seed=6).unet.parameters()), next(a.unet.parameters()))


def test_missing_or_wrong_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not load a diffusion pipeline from 'no-such-org/no-such-model'"):
        load_pipeline("no-such-org/no-such-model", local_files_only=True)
    with pytest.raises(ModelLoadError, match="unknown built-in model 'builtin:nope'"):
        load_pipeline("builtin:nope")


def test_xformers_where_it_cannot_run_is_a_clear_error():
    unet = build_tiny_pipeline().unet
    if torch.cuda.is_available():
        pytest.skip("this machine could run xformers")
    with pytest.raises(ModelLoadError, match="xformers cannot run here: .*Use model.attention=sdpa"):
        set_attention_backend(unet, "xformers")
    set_attention_backend(unet, "sdpa")  # the default needs nothing


def test_lora_targets_and_full_finetune_saving(tmp_path):
    pipe = build_tiny_pipeline()
    with pytest.raises(ModelLoadError, match="matched no UNet module"):
        prepare_trainable_denoiser(pipe, True, 4, 4.0, ["no_such_layer"])
    pipe = build_tiny_pipeline()
    params = prepare_trainable_denoiser(pipe, False, 4, 4.0, [])
    assert sum(p.numel() for p in params) == sum(p.numel() for p in pipe.unet.parameters())
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    with torch.no_grad():
        params[0].add_(1.0)
    out = save_trained_weights(pipe.unet, False, tmp_path)
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = UNet2DConditionModel.from_pretrained(out)
    assert torch.equal(next(reloaded.parameters()), params[0].detach())


def test_lora_on_attention_and_convolutions_loads_whole_in_plain_diffusers(tmp_path):
    """Every saved adapter (Linear and Conv2d alike) is restored by `load_lora_weights`, with its alpha/rank
    scaling, so plain diffusers reproduces the trained UNet's output exactly."""
    pipe = build_tiny_pipeline(seed=1)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]
    params = prepare_trainable_denoiser(pipe, True, 4, 8.0, targets)  # scaling alpha / rank = 2
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # LoRA B starts at zero: give every adapter a visible effect
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_trained_weights(pipe.unet, True, tmp_path)

    fresh = build_tiny_pipeline(seed=1)
    fresh.load_lora_weights(tmp_path)
    trained = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_B")}
    loaded = {n: m for n, m in fresh.unet.named_modules() if hasattr(m, "lora_B")}
    assert trained.keys() == loaded.keys()
    assert any(isinstance(m.base_layer, torch.nn.Conv2d) for m in loaded.values())
    assert any(isinstance(m.base_layer, torch.nn.Linear) for m in loaded.values())
    for name, m in loaded.items():
        (adapter,) = m.lora_B.keys()
        assert m.scaling[adapter] == 2.0, name
        assert torch.equal(m.lora_B[adapter].weight, trained[name].lora_B["default"].weight), name
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, fresh.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, 500, cond).sample, pipe.unet(x, 500, cond).sample)
