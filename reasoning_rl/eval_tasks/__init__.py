"""`drl reason eval --task` evaluations of the reasoning seeds (registered in reasoning_rl.registry.EVAL_TASKS)."""
