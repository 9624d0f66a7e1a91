"""`hone tune`: train extra parameters (LoRA, DoRA, IA3, prompt tuning, ... full fine-tuning) -> Artifact.

The methods are the tuning family of the one registry (`honellm.methods`); the verb's options and body are the
ones `hone align` has too (`honellm.cli.common.register_training_verb`).
"""

from __future__ import annotations

import typer

from honellm.cli.common import register_training_verb

HELP = """Fine-tune the task's model with a tuning method; write an Artifact (adapter or weights + prompt program).

Settings are key=value overrides: method and training settings (r=8 lr=1e-4 epochs=2 batch_size=4
eval_every=50 early_stopping_patience=3 precision=fp32 ...) or task fields (data.train=... model=...).
Runs under `accelerate launch` or `torchrun` for several processes (DDP) with the same command.
"""


def register(app: typer.Typer) -> None:
    register_training_verb(app, "tune", family="tuning", doc=HELP)
