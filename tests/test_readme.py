"""The README's Python API example runs as written, and the README keeps its two set-up commands."""

import re
from pathlib import Path

import torch

README = (Path(__file__).parents[1] / "README.md").read_text()


def _block_after(heading: str, lang: str) -> str:
    section = README.split(heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(Path(__file__).parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_block_after("## Python API", "python"), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result.history) == 2
    assert (tmp_path / "runs" / "api_demo" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert namespace["image"].size == (16, 16)
    printed = capsys.readouterr().out
    assert str([round(r["reward/mean"], 4) for r in result.history]) in printed


def test_reasoning_python_api_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(Path(__file__).parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_block_after("## Reasoning", "python"), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert len(result.history) == 2
    assert (tmp_path / "runs" / "reason_api_demo" / "lora" / "adapter_model.safetensors").is_file()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    torch.testing.assert_close(namespace["rloo"](rewards, torch.tensor([0, 0, 1, 1])), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert str([round(r["reward/mean"], 4) for r in result.history]) in capsys.readouterr().out


def test_readme_has_exactly_two_setup_commands():
    commands = [line for line in _block_after("## Set-up", "bash").splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("drl train") and commands[1].endswith("python -m pytest -q")
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in ci and "python -m pytest -q" in ci


def test_user_defined_tool_example_runs():
    from reasoning_rl.tools import TOOLS, call_tool

    namespace: dict = {}
    exec(compile(_block_after("### Tool-calling rollouts", "python"), "README.md", "exec"), namespace)
    try:
        assert call_tool(TOOLS, "area", {"box": [0, 0, 3, 4]}, None).text == "area: 12"
        bad = call_tool(TOOLS, "area", {"box": [1, 2]}, None)
        assert bad.error and "too short" in bad.text  # the schema is checked before the tool runs
    finally:
        TOOLS.pop("area", None)
