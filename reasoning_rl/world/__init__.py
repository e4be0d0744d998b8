"""The embedded reasoning worlds: generated problems with exact answers, and the tiny model trained on them.

* ``reasoning_rl.world.text``       - arithmetic word problems of 1-4 steps with worked traces (train/eval splits)
* ``reasoning_rl.world.visual``     - shapes-world scenes with count / colour / shape / position questions, boxes,
  captions (train/eval splits)
* ``reasoning_rl.world.gym``        - reasoning-gym tasks as a prompt source
* ``reasoning_rl.world.gym_reward`` - reasoning-gym's verifiers as the reward ``reasoning_gym``
* ``reasoning_rl.world.steps_reward`` - exact match + credit for the reference trace's steps (``arithmetic_steps``)
* ``reasoning_rl.world.pretrain``   - the from-scratch training script of the shipped tiny LM
* ``reasoning_rl.world.pretrain_vlm`` - the training script of the shipped tiny vision-language model
* ``TINY_ARITH_LM``                 - the shipped model directory (``model.pretrained: builtin:tiny-arith-lm``)
* ``TINY_ARITH_LM_MIXED``           - the same model further trained on a corpus where half of the solutions are bare
  answers (``model.pretrained: builtin:tiny-arith-lm-mixed``, the policy of ``configs/reason_default.yaml``)
* ``TINY_SHAPES_VLM``               - the shipped Qwen2-VL directory (``model.pretrained: builtin:tiny-shapes-vlm``)

In a config: ``prompts: {source: world, world: arithmetic, problem_column: prompt, solution_column: solution}``
(see ``configs/reason_default.yaml``), ``prompts: {source: reasoning_gym, tasks: [chain_sum], problem_column:
prompt}`` with ``reward: {name: reasoning_gym}``.

Importing this package registers the ``reasoning_gym`` and ``arithmetic_steps`` rewards in ``rewards`` (the trainer imports it through
``reasoning_rl.data``). Nothing heavy is imported here.
"""

from pathlib import Path

TINY_ARITH_LM = Path(__file__).resolve().parent.parent / "assets" / "tiny_lm"
TINY_ARITH_LM_MIXED = Path(__file__).resolve().parent.parent / "assets" / "tiny_lm_mixed"
TINY_SHAPES_VLM = Path(__file__).resolve().parent.parent / "assets" / "tiny_vlm"


def _register_rewards() -> None:
    from rewards import registry

    if "reasoning_gym" not in registry.REGISTRY:
        registry.register(
            "reasoning_gym", registry._Lazy("reasoning_rl.world.gym_reward", "make_reasoning_gym_reward"),
            registry.RewardInfo("-", "[0, 1] (NaN: no reasoning-gym entry)", "no weights (reasoning-gym: Apache-2.0)",
                                False, "text: the reasoning-gym task's own score_answer on the <answer> tag"),
        )
    if "arithmetic_steps" not in registry.REGISTRY:
        registry.register(
            "arithmetic_steps", registry._Lazy("reasoning_rl.world.steps_reward", "make_arithmetic_steps_reward"),
            registry.RewardInfo("-", "[0, 1 + step_weight] (NaN: no answer / reference solution)", "no weights",
                                False, "text: exact match + partial credit for the reference trace's leading steps"),
        )


_register_rewards()

__all__ = ["TINY_ARITH_LM", "TINY_ARITH_LM_MIXED", "TINY_SHAPES_VLM"]
