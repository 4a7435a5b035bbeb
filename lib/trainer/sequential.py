"""placement=sequential: one process per GPU runs the target forward, then the draft step.

The baseline users would otherwise run; it shares every line of engine and trainer code with the
paired placements and only swaps the handoff for a direct call.
"""
from __future__ import annotations

from lib.trainer.sources import InlineSource
from lib.launch.runtime import RunContext


def run_sequential(ctx: RunContext) -> None:
    from lib.engine.worker import EngineStepper
    from lib.trainer.loop import run_trainer

    run_trainer(ctx, source=InlineSource(EngineStepper(ctx)))
