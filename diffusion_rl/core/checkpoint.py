"""Atomic, verifiable checkpoints: accelerate state on every rank + trainer state + resolved config.

Layout of `<run>/checkpoints/checkpoint-<epochs done>/`:
    accelerate state (model.safetensors, optimizer.bin, random_states_<rank>.pkl, ...),
    trainer_state.json (epoch, global step, stat-tracker buffers, credit buffers, sampler state, versions),
    trainer_tensors.safetensors (tensor-valued trainer state, e.g. EMA weights; only when there is any),
    config.yaml (resolved), manifest.json (every file with size and sha256), written last.

Write order: everything goes to `checkpoint-N.tmp/` in the same directory, files are fsynced, the
manifest is written, then one `os.replace` makes it visible; older checkpoints are pruned only after
that. A directory without a valid manifest is never picked up by `--resume auto`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_tensors.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names it and the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durably(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(directory: Path) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(directory))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    _write_json_durably(directory / MANIFEST, {"files": files})


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory} is incomplete (no {MANIFEST}); it was not fully written")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{manifest} is corrupt ({err})") from None
    for rel, meta in files.items():
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {directory} is corrupt: {rel} is missing")
        if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint {directory} is corrupt: {rel} differs from its manifest "
                f"(size {p.stat().st_size} vs {meta['size']}); resume from another checkpoint"
            )


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints with a manifest, oldest first (by the epoch number in the name)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """`auto` -> the newest complete checkpoint of the run; otherwise a checkpoint directory path."""
    if resume == "auto":
        found = complete_checkpoints(output_dir / "checkpoints")
        if not found:
            raise CheckpointError(
                f"--resume auto: no complete checkpoint under {output_dir / 'checkpoints'}; "
                "run without --resume to start a new run, or pass --output-dir of an existing run"
            )
        path = found[-1]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    verify(path)
    return path


def save(
    accelerator, root: Path, epochs_done: int, trainer_state: dict, config_yaml: str, keep_last: int,
    tensors: dict | None = None,
) -> Path:
    """Collective: every rank must call it (accelerate writes per-rank RNG files)."""
    final = root / f"checkpoint-{epochs_done:06d}"
    tmp = root / f"{final.name}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash is never resumed from
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_durably(tmp / TRAINER_STATE, trainer_state)
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / TRAINER_TENSORS))
        (tmp / "config.yaml").write_text(config_yaml)
        write_manifest(tmp)  # the manifest is the commit marker: written last
        if final.exists():  # re-saving the same epoch (e.g. a rerun): the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(path: Path) -> tuple[dict, dict]:
    """(trainer_state.json, the tensors of trainer_tensors.safetensors or {})."""
    tensors = {}
    if (path / TRAINER_TENSORS).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(path / TRAINER_TENSORS))
    return json.loads((path / TRAINER_STATE).read_text()), tensors
