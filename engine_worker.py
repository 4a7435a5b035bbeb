"""Entry point of the engine role. train.py dispatches engine ranks here; the loop itself lives in
lib/engine/worker.py (run the frozen target over this pair's data shard, capture the states the draft
strategy asks for, hand them to the paired trainer).
"""
from __future__ import annotations

from lib.launch.runtime import RunContext


def run(ctx: RunContext) -> None:
    from lib.engine.worker import run_engine

    run_engine(ctx)
