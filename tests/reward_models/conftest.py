"""Tiny randomly initialised reward models, saved once per session in the published file formats."""

import json

import pytest
import torch

V = 514  # byte-level CLIP vocab: 256 bytes + 256 bytes</w> + <|startoftext|> + <|endoftext|>
BLIP_V = 40

TINY_BLIP = {
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "intermediate_size": 128, "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6},
    "text_config": {"vocab_size": BLIP_V, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 96, "max_position_embeddings": 64, "encoder_hidden_size": 32,
                    "layer_norm_eps": 1e-12, "pad_token_id": 0, "bos_token_id": BLIP_V - 2,
                    "eos_token_id": 3, "sep_token_id": 3},
    "projection_dim": 16,
}

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _byte_chars():
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_clip_model(seed=0):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=V - 2, eos_token_id=2, pad_token_id=V - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    return model


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A CLIPModel + CLIPProcessor directory, as on the hub (save_pretrained)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    ip = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    tiny_clip_model().save_pretrained(d)
    return d


def _mlp_state(in_dim, seed):
    g = torch.Generator().manual_seed(seed)
    dims = [(in_dim, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    sd = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), dims, strict=True):
        sd[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        sd[f"layers.{idx}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


@pytest.fixture(scope="session")
def aesthetic_head_dir(tmp_path_factory):
    """``aesthetic-model.pth``: a plain state dict (keys layers.{0,2,4,6,7}), in_dim = projection_dim."""
    d = tmp_path_factory.mktemp("aesthetic_head")
    torch.save(_mlp_state(16, seed=1), d / "aesthetic-model.pth")
    return d


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory):
    """open_clip JSON config + ``{"state_dict": sd}`` checkpoints under the HPS file names."""
    import open_clip

    d = tmp_path_factory.mktemp("tiny_hps")
    cfg = d / "drl-tiny-hps.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg)
    states = {}
    for seed, fname in ((2, "HPS_v2_compressed.pt"), (3, "HPS_v2.1_compressed.pt")):
        torch.manual_seed(seed)
        model = open_clip.create_model("drl-tiny-hps", pretrained=None)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"state_dict": sd}, d / fname)
        states[fname] = sd
    return {"dir": d, "config": cfg, "name": "drl-tiny-hps", "states": states}


def blip_to_imagereward_key(key):
    """Inverse of the loader's conversion, written independently: transformers BLIP -> ImageReward.pt."""
    vis = {
        "vision_model.embeddings.class_embedding": "blip.visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "blip.visual_encoder.pos_embed",
    }
    if key in vis:
        return vis[key]
    if key.startswith("vision_model.embeddings.patch_embedding."):
        return "blip.visual_encoder.patch_embed.proj." + key.split(".")[-1]
    if key.startswith("vision_model.post_layernorm."):
        return "blip.visual_encoder.norm." + key.split(".")[-1]
    if key.startswith("vision_model.encoder.layers."):
        parts = key.split(".")
        i, rest = parts[3], ".".join(parts[4:])
        rest = (rest.replace("layer_norm1.", "norm1.").replace("layer_norm2.", "norm2.")
                .replace("self_attn.projection.", "attn.proj.").replace("self_attn.qkv.", "attn.qkv."))
        return f"blip.visual_encoder.blocks.{i}.{rest}"
    return "blip." + key


@pytest.fixture(scope="session")
def tiny_imagereward(tmp_path_factory):
    """``ImageReward.pt`` in ImageReward key format + ``med_config.json`` + a BERT vocab tokenizer dir."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    d = tmp_path_factory.mktemp("tiny_imagereward")
    torch.manual_seed(4)
    model = BlipForImageTextRetrieval(BlipConfig(**TINY_BLIP)).eval()
    blip_sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("itm_head.")}
    head_sd = _mlp_state(24, seed=5)
    ckpt = {blip_to_imagereward_key(k): v for k, v in blip_sd.items()}
    ckpt["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    ckpt.update({f"mlp.{k}": v for k, v in head_sd.items()})
    torch.save(ckpt, d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps({**TINY_BLIP["text_config"], "model_type": "bert",
                                                   "encoder_width": 32, "add_cross_attention": True}))
    tok_dir = tmp_path_factory.mktemp("tiny_bert_tok")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "blue", "sphere", "photo",
             "of", "the", "green", "cat", "dog", "on", "table", "big", "small", "two", "three", "and", "in"]
    (tok_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tok_dir / "vocab.txt")).save_pretrained(tok_dir)
    return {"dir": d, "tokenizer": tok_dir, "config": TINY_BLIP, "blip_sd": blip_sd, "head_sd": head_sd,
            "checkpoint": ckpt}
