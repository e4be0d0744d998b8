"""Config validation: every shipped YAML, unknown keys, cross-field rules, overrides, CLI errors."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffusion_rl.cli import _mount_reward_cli, app
from diffusion_rl.config import (
    ConfigError,
    RunConfig,
    documented_fields,
    dump_config,
    load_config,
)

SHIPPED = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
# The reasoning trainers' YAMLs: named reason_*, or naming their trainer (glider, see) with a top-level `trainer:`.
REASON_CONFIGS = [p for p in SHIPPED if p.name.startswith("reason_") or "trainer" in (yaml.safe_load(p.read_text()) or {})]
CONFIGS = [p for p in SHIPPED if p not in REASON_CONFIGS]  # the diffusion trainer's
runner = CliRunner()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    geo = cfg.geometry(world_size=1)
    assert geo["samples_per_epoch"] == cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
    if cfg.prompts.source == "file":
        assert Path(cfg.prompts.path).is_file(), f"{path.name} points at a missing prompt file"


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", REASON_CONFIGS, ids=[p.name for p in REASON_CONFIGS])
def test_every_shipped_reasoning_config_validates(path):
    from reasoning_rl import registry

    name = registry.trainer_name(path)
    cfg = registry.trainer_module(name).load_config(path, [])
    assert cfg.trainer == name


def test_every_shipped_config_is_validated_by_one_of_the_trainers():
    assert REASON_CONFIGS and set(CONFIGS) | set(REASON_CONFIGS) == set(SHIPPED)


def test_no_config_means_configs_default_yaml():
    """`drl train` with no CONFIG runs configs/default.yaml: the shipped tiny model, alignment reward, CoCA."""
    from diffusion_rl.cli import DEFAULT_CONFIG

    # the package's shipped copy is the repository's configs/ (diffusion_rl/configs links to it)
    assert DEFAULT_CONFIG.read_bytes() == (Path(__file__).parents[1] / "configs" / "default.yaml").read_bytes()
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model.pretrained == "builtin:tiny-shapes"
    assert cfg.reward.name == "shapes_alignment" and cfg.credit.kind == "coca"
    assert cfg.eval.prompts == "world:eval" and cfg.prompts.source == "world"
    shown = runner.invoke(app, ["config", "show"])
    assert yaml.safe_load(shown.output) == cfg.model_dump(mode="json")


def test_every_field_is_documented():
    fields = documented_fields()
    assert len(fields) > 60
    assert [p for p, doc in fields if len(doc.split()) < 2] == []


def test_all_problems_reported_at_once_with_paths_values_and_fixes():
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            [
                "train.lerning_rate=1e-3",  # typo
                "sample.eta=0",  # bad value
                "sample.batch_size=6",  # not divisible by images_per_prompt=4
                "credit.kind=coca",
                "credit.window=3",  # does not divide num_steps=10
                "credit.alpha=1.5",  # out of range
            ],
        )
    problems = exc.value.problems
    text = str(exc.value)
    assert len(problems) == 5
    assert "train.lerning_rate: unknown key; did you mean 'train.learning_rate'?" in text
    assert "sample.eta" in text and "got 0" in text
    assert "sample.batch_size (6) must be divisible by sample.images_per_prompt (4)" in text
    assert "credit.window (3) must divide sample.num_steps (10)" in text
    assert "credit.alpha" in text and "1.5" in text


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.batch_size=3"], "must be divisible by train.batch_size x train.gradient_accumulation_steps"),
        (["train.timestep_fraction=0.5"], "timestep_selection=all trains every step"),
        (["train.timestep_fraction=0.05", "train.timestep_selection=random"], "trains no step"),
        (["train.skip_final_steps=10"], "train.skip_final_steps (10) leaves none of the sample.num_steps (10) steps"),
        (["train.lr_warmup_steps=9"], "train.lr_warmup_steps (9) exceeds the run's optimizer steps (2 epochs x 4 updates = 8)"),
        (["train.lr_schedule=step"], "train.lr_schedule"),
        (["train.kl_coef=0.1", "model.use_lora=false"], "needs model.use_lora=true"),
        (["model.text_encoder_lora_rank=4", "model.use_lora=false"], "model.text_encoder_lora_rank=4 needs model.use_lora=true"),
        (["model.text_encoder_lora_rank=4", "train.kl_coef=0.1"], "does not switch off the text encoder's adapter"),
        (["reward.name=null"], "set reward.name"),
        (["prompts.source=file"], "needs prompts.path"),
        (["model.dtype=float64"], "model.dtype"),
        (["foo=1"], "foo: unknown key"),
        (["sample"], "expected key.path=value"),
        (["advantage.min_count=64"], "advantage.min_count (64) exceeds advantage.buffer_size (32)"),
        (["credit.kind=coca", "credit.window=2", "credit.buffer_size=31"],
         "credit.buffer_size (31) must be even with credit.stage2=paper"),
        (["credit.kind=coca", "credit.window=2", "credit.stage2=batch", "advantage.per_prompt_stat_tracking=false"],
         "set credit.stage2=global"),
    ],
)
def test_each_rule_has_a_clear_message(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as exc:
        load_config(None, overrides)
    assert fragment in str(exc.value)


def test_stage2_global_pairs_with_batch_statistics():
    cfg = load_config(None, ["credit.kind=coca", "credit.window=2", "credit.stage2=global",
                             "advantage.per_prompt_stat_tracking=false"])
    assert cfg.credit.stage2 == "global"


def test_value_rules_that_used_to_raise_are_config_errors_with_exit_2(tmp_path):
    """Rules the trainer's components used to enforce with a bare ValueError at start-up."""
    for sets in (["advantage.min_count=64"], ["credit.kind=coca", "credit.window=2", "credit.buffer_size=7"]):
        result = runner.invoke(app, ["train", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]])
        assert result.exit_code == 2, result.output
        assert "problem(s)" in result.output and "Traceback" not in result.output


def test_eval_reward_takes_a_name_or_name_and_options():
    """A run trained on a shaped reward reports the plain metric: eval.reward with its own options."""
    from diffusion_rl.trainer import _load_eval_reward

    assert load_config(None, ["eval.reward=shapes_alignment"]).eval.reward.name == "shapes_alignment"
    cfg = load_config(None, ["reward={name: shapes_alignment, options: {mode: graded}}",
                             "eval.reward={name: shapes_alignment, options: {}}"])
    assert cfg.eval.reward.options == {} and cfg.reward.options == {"mode": "graded"}
    train_reward = cfg.reward.build()
    eval_reward = _load_eval_reward(cfg, train_reward)
    assert eval_reward is not train_reward and (train_reward._fn.mode, eval_reward._fn.mode) == ("graded", "partial")
    # the same reward with the same options (or no eval.reward) is the training reward's own object
    strict = "{name: shapes_alignment, options: {mode: strict}}"
    for sets in (["eval.reward=null"], [f"reward={strict}", f"eval.reward={strict}"]):
        cfg = load_config(None, sets)
        train_reward = cfg.reward.build()
        assert _load_eval_reward(cfg, train_reward) is train_reward
    with pytest.raises(ConfigError, match=r"eval.reward: give either reward.name or reward.components"):
        load_config(None, ["eval.reward={name: aesthetic, components: [{name: jpeg_compressibility}]}"])


def test_mixed_precision_no_is_accepted_from_yaml_and_set(tmp_path):
    """YAML 1.1 reads a bare `no` (accelerate's spelling) as false."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])


def test_field_docs_name_only_fields_that_exist():
    import re

    paths = {p for p, _ in documented_fields()}
    sections = {p.split(".")[0] for p in paths if "." in p}
    named = {m for _, doc in documented_fields() for m in re.findall(r"\b([a-z_]+\.[a-z_]+)\b", doc)
             if m.split(".")[0] in sections}
    assert named and named <= paths, sorted(named - paths)
    # bare snake_case names too (e.g. a `num_prompts` that no section has), apart from these non-field words
    leaves = {p.split(".")[-1] for p in paths} | {"model_index", "reward_to_go", "diffusion_rl", "sigma_t"}
    leaves |= {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}  # SD3 / FLUX module names
    bare = {m for _, doc in documented_fields() for m in re.findall(r"(?<![\w./-])([a-z]+_[a-z_]+)\b", doc)}
    assert bare <= leaves, sorted(bare - leaves)


def test_overrides_are_typed_and_round_trip(tmp_path):
    cfg = load_config(None, ["train.learning_rate=1e-5", "sample.num_steps=20", "prompts.prompts=[a, b]"])
    assert cfg.train.learning_rate == 1e-5 and cfg.sample.num_steps == 20 and cfg.prompts.prompts == ["a", "b"]
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(path).hash() == cfg.hash()


def test_relative_prompt_file_resolves_beside_the_yaml(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    (tmp_path / "c.yaml").write_text("prompts: {source: file, path: p.txt}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert Path(cfg.prompts.path) == tmp_path / "p.txt"


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: {batch_size: 6}\ntrain: {learnig_rate: 1}\n")
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "2 problem(s)" in result.output and "did you mean 'train.learning_rate'" in result.output
    assert "Traceback" not in result.output
    missing = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_cli_config_show_prints_resolved_yaml_and_docs():
    result = runner.invoke(app, ["config", "show", "configs/tiny.yaml", "--set", "train.learning_rate=0.5"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["learning_rate"] == 0.5 and shown["sample"]["num_steps"] == 4
    doc = runner.invoke(app, ["config", "show", "--doc"])
    assert "credit.alpha: CoCA blend" in doc.output


def test_every_command_and_option_has_help():
    _mount_reward_cli()
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["config", "show", "--help"],
                 ["credit", "inspect", "--help"], ["reward", "--help"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, (argv, result.output)
    help_text = runner.invoke(app, ["train", "--help"]).output
    for option in ("--set", "--output-dir", "--resume"):
        assert option in help_text


ACCELERATE = sorted((Path(__file__).parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_shipped_accelerate_configs_load(path):
    """The multi-GPU recipes parse with accelerate's own config loader (what `accelerate launch --config_file` reads)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes == 2 and cfg.distributed_type.value in ("FSDP", "MULTI_GPU")
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_use_orig_params"] is True  # LoRA next to frozen weights
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
