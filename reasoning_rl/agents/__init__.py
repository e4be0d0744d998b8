"""Language agents in text environments, and GLIDER (offline hierarchical RL, arXiv 2505.19761).

* ``reasoning_rl.agents.env``               - the environment interface (reset / step / valid actions, seeded), the
  counted no-op for invalid or malformed actions, ``make_env(name)``
* ``reasoning_rl.agents.rooms``             - ``rooms``: the embedded procedural text environment (seen / unseen
  tasks, sub-goals, changed variants ``rooms-moved`` / ``rooms-rewired``), its expert and medium policies
* ``reasoning_rl.agents.scienceworld_env``  - the ScienceWorld adapter (needs Java), gold sequences as offline data
* ``reasoning_rl.agents.lm``                - the built-in word-level backbone (``builtin:rooms-word-lm``)
* ``reasoning_rl.agents.glider``            - prompts, critic heads, TD target, Polyak update, AWAC / Q weighting
* ``reasoning_rl.agents.data``              - episodes -> high-level transitions, relabelled low-level rows, flat rows
* ``reasoning_rl.agents.agent``             - batched episodes of the hierarchical or flat agent
* ``reasoning_rl.agents.config`` / ``trainer`` / ``entry`` - ``drl reason train configs/glider_text.yaml``
* ``reasoning_rl.agents.evaluation``        - ``drl reason eval RUN --task env:rooms``

Nothing heavy is imported here.
"""
