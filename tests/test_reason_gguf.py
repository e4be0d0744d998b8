"""model.gguf_file: a tiny Llama with a byte-level BPE tokenizer written as a real GGUF file with gguf's GGUFWriter
(fp32 tensors under llama.cpp's names, Q/K rows permuted as llama.cpp's converter does, the tokenizer metadata
transformers' GGUF loader reads), then loaded through drl's config and load_policy: the same tokens, the same logits,
and a 1-step train() with LoRA and with full fine-tuning (whose saved model plain transformers reloads)."""

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'diffusion-rl[gguf]')")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from reasoning_rl.config import load_config  # noqa: E402
from reasoning_rl.gguf_checkpoint import as_plain_checkpoint  # noqa: E402
from reasoning_rl.models import load_policy  # noqa: E402
from reasoning_rl.trainer import train  # noqa: E402

TINY = Path(__file__).parents[1] / "configs" / "reason_tiny.yaml"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 2


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (300 tokens) trained offline on arithmetic text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([f"What is {a} + {b}? The answer is {a + b}." for a in range(20) for b in range(20)]
                                + ["user assistant system"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHAT)


def llama_cpp_permute(weights, n_head: int):
    """llama.cpp's convert_hf_to_gguf permutation of Q / K rows (transformers' GGUF loader reverses it)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_gguf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("drl-tiny-llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    # tokenizer: byte-level BPE ("gpt2"), tokens in id order, control tokens marked, merges, special ids, template
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    # tensors under llama.cpp's names (gguf's own HF -> GGUF name map); the tied lm_head is not written
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        array = param.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, c.num_key_value_heads)
        w.add_tensor(f"{names.get_name(stem)}.{suffix}", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tokenizer = byte_level_bpe()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("gguf")
    write_gguf(model, tokenizer, directory / "tiny.gguf")
    return directory, model, tokenizer


def test_a_self_written_gguf_loads_through_drl_with_the_same_tokens_and_logits(tiny_gguf):
    directory, original, tokenizer = tiny_gguf
    cfg = load_config(TINY, [f"model.pretrained={directory}", "model.gguf_file=tiny.gguf"])
    model, loaded_tok = load_policy(cfg.model.pretrained, gguf_file=cfg.model.gguf_file)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == KV_HEADS
    text = loaded_tok.apply_chat_template([{"role": "user", "content": "What is 3 + 14?"}], tokenize=False,
                                          add_generation_prompt=True)
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 14?"}], tokenize=False,
                                                 add_generation_prompt=True)
    ids = loaded_tok(text, add_special_tokens=False).input_ids
    assert ids == tokenizer(text, add_special_tokens=False).input_ids and ids[0] == tokenizer.bos_token_id
    assert loaded_tok.eos_token == "<|im_end|>" and loaded_tok.padding_side == "left"
    assert loaded_tok.decode(ids[1:8]) == tokenizer.decode(ids[1:8])
    x = torch.tensor([ids, ids[::-1]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)
    # transformers keeps its GGUF quantizer on the dequantised model; as_plain_checkpoint drops it
    assert model.hf_quantizer is not None
    plain = as_plain_checkpoint(model)
    assert plain.hf_quantizer is None and not hasattr(plain.config, "quantization_config")


@pytest.mark.parametrize("use_lora", [True, False])
def test_one_training_step_on_the_gguf_model(tiny_gguf, tmp_path, use_lora):
    directory, original, tokenizer = tiny_gguf

    def digits(completions, prompts, metadata):
        return torch.tensor([sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]), {}

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "num_steps=1", "checkpoint.every=0", "rollout.max_new_tokens=4",
                             f"model.pretrained={directory}", "model.gguf_file=tiny.gguf", f"model.use_lora={use_lora}",
                             "eval.problems=[]"])
    result = train(cfg, reward_fn=digits)
    record = result.history[0]
    assert record["loss/grad_norm"] > 0 and 0 <= record["reward/mean"] <= 1
    assert result.weights_dir == tmp_path / ("lora" if use_lora else "model")
    if not use_lora:  # the fully fine-tuned model is an ordinary checkpoint plain transformers reloads
        saved = json.loads((result.weights_dir / "config.json").read_text())
        assert "quantization_config" not in saved
        reloaded = AutoModelForCausalLM.from_pretrained(result.weights_dir).eval()
        x = torch.tensor([tokenizer("What is 2 + 2?").input_ids])
        result.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(x).logits, result.model(x).logits, atol=1e-6, rtol=0)
            assert not torch.allclose(reloaded(x).logits, original(x).logits, atol=1e-6)  # it trained


def test_fetch_smollm2s_conversion_turns_a_gguf_into_a_plain_checkpoint(tiny_gguf, tmp_path):
    """reasoning_rl.fetch_smollm2.convert (the step after the download) on the self-written file: an ordinary
    transformers directory with the same logits and tokenizer, no quantization_config."""
    from transformers import AutoTokenizer

    from reasoning_rl.fetch_smollm2 import convert

    directory, original, tokenizer = tiny_gguf
    out = convert(directory / "tiny.gguf", tmp_path / "plain")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "1 + 2"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == tokenizer(text, add_special_tokens=False).input_ids and tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, original(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=1e-5)
