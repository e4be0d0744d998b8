"""Continual fine-tuning: SEE, the sequential ensemble of LoRA experts (arXiv 2504.06664).

* ``reasoning_rl.continual.config``     - the typed config (``trainer: see``)
* ``reasoning_rl.continual.tasks``      - the task sequence's items and SEE's indicator-labelled examples
* ``reasoning_rl.continual.experts``    - adapters on one base model, expert training, sequential routing, scoring
* ``reasoning_rl.continual.trainer``    - the loop (one expert per task, checkpoints between tasks)
* ``reasoning_rl.continual.entry``      - what ``drl reason train configs/see_continual.yaml`` calls
* ``reasoning_rl.continual.evaluation`` - ``drl reason eval RUN --task see``
"""
