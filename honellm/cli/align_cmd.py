"""`hone align`: reward-based training (reward model, DPO/IPO/cDPO/KTO/ORPO/SimPO, online RL) -> Artifact.

The methods are the reward family of the one registry (`honellm.methods`); the verb's options and body are the
ones `hone tune` has too (`honellm.cli.common.register_training_verb`).
"""

from __future__ import annotations

import typer

from honellm.cli.common import register_training_verb

HELP = """Train with rewards or preferences: a reward model, DPO and its family, online RL -> Artifact.

Settings are key=value overrides: method and training settings (beta=0.1 lr=5e-5 max_steps=200
batch_size=4 max_length=512 r=16 eval_every=50 ...) or task fields (data.train=... model=...).
Runs under `accelerate launch` or `torchrun` for several processes (DDP) with the same command.
"""


def register(app: typer.Typer) -> None:
    register_training_verb(app, "align", family="reward", show_kind=True, doc=HELP)
