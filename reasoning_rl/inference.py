"""Loading a language model or a trained reasoning run for sampling and evaluation, through plain transformers
and peft (what users do after training)."""

from __future__ import annotations

from pathlib import Path

from reasoning_rl.config import ReasonConfig, load_config
from reasoning_rl.models import ModelLoadError, load_policy


def load_for_inference(model_or_run: str) -> tuple[object, object, ReasonConfig | None]:
    """A run directory (has config.yaml): its base model with the trained LoRA (`lora/`), or its fully fine-tuned
    model (`model/`). Anything else is loaded as a model. Returns (model, tokenizer, the run's config or None)."""
    run = Path(model_or_run)
    if not (run / "config.yaml").is_file():
        model, tokenizer = load_policy(model_or_run)
        return model.eval(), tokenizer, None
    cfg = load_config(run / "config.yaml")
    m = cfg.model
    if (run / "lora" / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = load_policy(m.pretrained, m.revision, m.dtype, m.local_files_only, m.trust_remote_code,
                                      m.gguf_file, m.seed)
        model = PeftModel.from_pretrained(base, run / "lora")
    elif (run / "model" / "config.json").is_file():
        model, tokenizer = load_policy(str(run / "model"), dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    else:
        raise ModelLoadError(
            f"{run} is a drl reasoning run without trained weights (no lora/ or model/); it has not finished. "
            f"Resume it with `drl reason train {run / 'config.yaml'} --output-dir {run} --resume auto`, or pass the "
            "base model"
        )
    return model.eval(), tokenizer, cfg
