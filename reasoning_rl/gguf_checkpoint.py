"""A model transformers loaded from a GGUF file (`from_pretrained(dir, gguf_file=...)`) as an ordinary checkpoint.

transformers 5 loads a GGUF file through its `GgufHfQuantizer`: architectures its legacy GGUF path handles (Llama,
Qwen2, ...) come out dequantised to plain float weights, yet the model keeps `hf_quantizer` and
`config.quantization_config`, so `save_pretrained` refuses it ("quantized with gguf and is not serializable") and
a saved config would claim a quantisation the weights no longer have. `as_plain_checkpoint` drops both when nothing
is left packed. Used by the reasoning trainer's set-up (full fine-tuning saves the model) and by
`reasoning_rl.fetch_smollm2`.
"""

from __future__ import annotations

from reasoning_rl.models import ModelLoadError


def packed_gguf_modules(model) -> list[str]:
    """Names of modules that still hold GGUF blocks (transformers' GgufLinear / GgufEmbedding / GgufExperts)."""
    return [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]


def as_plain_checkpoint(model):
    """`model` without its GGUF quantizer when every weight is a plain float tensor (in place; returns it). A model
    transformers kept in packed GGUF blocks cannot be trained or saved as floats: that is a clear error."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    method = getattr(qconfig, "quant_method", None) or (qconfig.get("quant_method") if isinstance(qconfig, dict) else None)
    if quantizer is None and qconfig is None:
        return model
    if str(getattr(method, "value", method)) != "gguf":
        return model  # another quantisation (bitsandbytes, ...): not ours to undo
    packed = packed_gguf_modules(model)
    if packed:
        raise ModelLoadError(
            f"model.gguf_file: transformers kept {len(packed)} module(s) in packed GGUF blocks (e.g. {packed[0]}), "
            "which drl cannot train; load it dequantised (GgufConfig(dequantize=True)) or convert it once to a "
            "float checkpoint (as python -m reasoning_rl.fetch_smollm2 does) and train that directory")
    model.hf_quantizer = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return model
