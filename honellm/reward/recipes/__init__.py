"""The reward-based recipes: one module per method (or family of methods), each registered in the one registry
of methods (`honellm.methods`) with one line beside its definition:

    register_method(Method("grpo", "reward", GRPOConfig, grpo, "group relative policy optimisation ...",
                           "https://arxiv.org/abs/2402.03300", needs=("references", "rewards")))

A recipe is a flat function `recipe(task, config, *, out=None, resume=False, force=False) -> Artifact` read top to
bottom; its config derives from `honellm.training.config.TrainingConfig` to share lr/batch_size/max_steps/... with
`hone tune`. Adding a method: docs/adding-a-method.md.

Built in: `reward_model` (`reward_model.py`), `dpo`, `ipo`, `cdpo`, `kto`, `orpo`, `simpo` (`preference.py`),
`grpo`, `rloo` (`grpo.py`), `ppo` (`ppo.py`), `rft` (`rft.py`), `best_of_n` (`best_of_n.py`), `judge` (`judge.py`:
a pairwise judge trained on the pairs); what the offline ones
share (adapter settings, run folder, pair encoding) is in `common.py`.
"""

from __future__ import annotations


def align_task(task_path: str, method: str | None, overrides: list[str] | None = None, **options):
    """What `hone align` does (`honellm.methods.catalog.run_task` for the reward family): split the overrides into
    task fields and method settings, read the method's config, load the task, run the recipe -> Artifact."""
    from honellm.methods.catalog import run_task

    return run_task(task_path, method, overrides, family="reward", **options)
