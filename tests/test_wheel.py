"""A wheel built with `pip wheel .` and installed outside the source tree carries the shipped configs and the
tiny model: `drl config show` and `drl train --help` work there with the embedded default."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).parents[1]


def test_wheel_installed_outside_the_repo_has_the_default_config(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"diffusion_rl/configs/default.yaml", "diffusion_rl/configs/tiny.yaml",
            "diffusion_rl/configs/prompts/simple_animals.txt",
            "diffusion_rl/assets/tiny-shapes/unet/diffusion_pytorch_model.safetensors"} <= names
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    def drl(*args):
        return subprocess.run([sys.executable, "-c", "import sys; from diffusion_rl.cli import main; sys.argv[0] = 'drl'; main()",
                               *args], capture_output=True, text=True, cwd=away, env=env, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import diffusion_rl; print(diffusion_rl.__file__)"],
                           capture_output=True, text=True, cwd=away, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr  # not the source tree
    shown = drl("config", "show")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert yaml.safe_load(shown.stdout)["model"]["pretrained"] == "builtin:tiny-shapes"
    assert yaml.safe_load(shown.stdout) == yaml.safe_load(drl("config", "show", str(REPO / "configs" / "default.yaml")).stdout)
    helped = drl("train", "--help")
    assert helped.returncode == 0 and "--resume" in helped.stdout
