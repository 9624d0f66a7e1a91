"""`hone align`: reward-based training: reward model, DPO/IPO/KTO/ORPO/SimPO, GRPO/RLOO, PPO, rejection sampling -> Artifact."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("align", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def align_command(ctx: typer.Context):
        """Reward-based training: reward model, DPO/IPO/KTO/ORPO/SimPO, GRPO/RLOO, PPO, rejection sampling -> Artifact."""
        not_yet("align", 6, "reward-based training (reward models, DPO family, GRPO/RLOO, PPO, best-of-n)")
