"""Entry point for every rank under torchrun: compose config, build topology, dispatch on role.

    torchrun --nproc_per_node=2N train.py [hydra overrides]

Local ranks [0, P/2) of a node are trainers, [P/2, P) engines (trainer r pairs with engine r + P/2);
placement=sequential runs one process per GPU that plays both roles.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch

from lib.config import ConfigError, Device, LaunchShape, compose, resolve
from lib.config.check import prepare_run_dir, validate
from lib.launch.stopping import install_stop_handlers, record_error
from lib.launch.exiting import exit_without_teardown
from lib.launch.runtime import RunContext, agree_run_dir, cap_process_memory, setup_logging, all_ranks_barrier  # noqa: E501
from lib.target.checkpoint import prepare_target
from lib.launch.topology import Role, Topology, build_groups, check_groups, destroy, gather_topology, init_world  # noqa: E501


def visible_gpus() -> int:
    # device_count() does not create a CUDA context, so MPS settings applied later still take effect.
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def write_run_files(ctx: RunContext, records: list[dict]) -> None:
    from omegaconf import OmegaConf

    os.makedirs(ctx.run_dir, mode=0o700, exist_ok=True)  # user-only: checkpoints are loaded back
    with open(os.path.join(ctx.run_dir, "topology.json"), "w") as f:
        json.dump({"world_size": ctx.topo.world_size, "nnodes": ctx.topo.nnodes,
                   "nproc_per_node": ctx.topo.nproc_per_node, "placement": ctx.topo.placement.value,
                   "mps": os.environ.get("SPECDRAFT_MPS", "unknown"), "ranks": records}, f, indent=1)
    # ctx.cfg is the resolved config: the device, dtype, compile and attention choices the run made.
    OmegaConf.save(OmegaConf.structured(ctx.cfg), os.path.join(ctx.run_dir, "config.yaml"))


def claim_config_report() -> bool:
    """Whether this rank prints the config error: one rank per node, the first to get there.

    Every rank fails the same way, and torchrun stops the other ranks once one exits, so waiting for
    rank 0 can lose the message. The ranks of a node share torchrun's attempt directory (two levels
    above TORCHELASTIC_ERROR_FILE); creating a file there exclusively elects the reporter.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return True  # not under torchrun: this process is alone
    marker = os.path.join(os.path.dirname(os.path.dirname(error_file)), "specdraft-config-error")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        # The reporter may be between claiming and printing; torchrun stops it once any rank exits.
        time.sleep(0.5)
        return False
    except OSError:
        return True  # no shared directory: better every rank than none
    return True


def record_dry_run(ctx: RunContext, sums: dict[str, int]) -> None:
    """Per-rank evidence that each group reduced over exactly its members (for cluster checks)."""
    out = os.path.join(ctx.run_dir, "dry_run")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank-{ctx.info.rank}.json"), "w") as f:
        json.dump({"rank": ctx.info.rank, "role": ctx.info.role.value, "sums": sums}, f)


def dispatch(ctx: RunContext) -> None:
    if ctx.info.role == Role.trainer:
        from lib.trainer.loop import run_trainer
        run_trainer(ctx)
    elif ctx.info.role == Role.engine:
        import engine_worker
        engine_worker.run(ctx)
    else:
        from lib.trainer.sequential import run_sequential
        run_sequential(ctx)


def main(overrides: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    log = setup_logging(f"[rank {rank}]")
    # SIGTERM/SIGINT from here on: finish the step in flight, checkpoint, exit 0 (lib/launch/stopping.py).
    install_stop_handlers()
    try:
        cfg = compose(overrides)
        gpus = visible_gpus()
        shape = LaunchShape.from_env(gpus)
        validate(cfg, shape)
        if cfg.draft.init_from is not None:  # fine-tuning another family's export fails here, naming both
            from lib.drafts.base import family_of_export
            family_of_export(cfg.draft.init_from, cfg.draft.name,
                             "pass draft={family}, or draft.init_from=<an export of the {requested} family>")
        cfg = resolve(cfg, shape)  # from here on no "auto" or None: every role reads these values
        # An HF directory with its shape recorded (a GGUF is dequantized once, all ranks share the copy).
        cfg = prepare_target(cfg)
    except ConfigError as exc:
        if claim_config_report():
            log.error("config error: %s", exc)
        record_error(exc, rank, "config", 2)
        return 2
    use_cuda = cfg.device == Device.cuda
    topo = Topology(shape.nnodes, shape.nproc_per_node, cfg.placement.name, use_cuda, cfg.engine.tp)
    info = topo.rank_info(rank)
    log = setup_logging(f"[rank {rank} {info.role.value}]")
    if use_cuda:
        torch.cuda.set_device(torch.device(info.device))
    cap_process_memory(cfg, topo.placement, info.role, torch.device(info.device))
    groups = None
    try:
        init_world(cfg.run.startup_timeout_s)
        groups = build_groups(topo, info, cfg.run.startup_timeout_s)
        cfg = agree_run_dir(cfg, groups)
        ctx = RunContext(cfg, topo, info, groups, cfg.run.dir)
        if rank == 0:
            # Before the all-gather below: no rank writes into the run dir until it is cleared.
            for line in prepare_run_dir(cfg):
                log.info("%s", line)
        records = gather_topology(groups, info)
        if rank == 0:
            write_run_files(ctx, records)
            from omegaconf import OmegaConf
            log.info("resolved config:\n%s", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            log.info("topology: %d ranks on %d node(s), placement=%s, run dir %s", topo.world_size,
                     topo.nnodes, topo.placement.value, ctx.run_dir)
        if cfg.train.max_steps == 0 or cfg.run.dry_run:
            sums = check_groups(topo, groups, info)
            log.info("dry run: groups ok %s", sums)
            record_dry_run(ctx, sums)
            all_ranks_barrier(groups, cfg.run.startup_timeout_s, "dry run done")
            return 0
        dispatch(ctx)
        # Leave together: a rank tearing its gloo pairs down while a peer is still inside its last
        # collective's cleanup can abort that peer (std::terminate in gloo), failing a finished run.
        # The start-up bound, not the loop's: pair 0's trainer may still be running the final evaluation.
        all_ranks_barrier(groups, cfg.run.startup_timeout_s, "run end")
        return 0
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            log.error("interrupted")
        else:
            log.error("rank %d (%s) failed: %s\n%s", rank, info.role.value, exc, traceback.format_exc())
        from lib.handoff.control import end_silent_peer, silent_peer_pid
        # torchrun's error file for this rank: launch.sh's summary reads the root cause from it. Written
        # before the silent peer (if any) is ended: torchrun reacts to that death by signalling this rank.
        record_error(exc, rank, info.role.value, 1, silent_peer_pid(exc))
        ended = end_silent_peer(exc)
        if ended is not None:
            log.error("ended the silent peer (pid %d): stopped or hung, it cannot act on torchrun's SIGTERM, which "
                      "would wait 30 s before killing it", ended)
        return 1
    finally:
        destroy(groups)


if __name__ == "__main__":
    # Only as a program: main() has closed what it wrote (metrics, checkpoints, exports, the error
    # file) and left its groups; tests that call main() in-process keep a normal interpreter.
    exit_without_teardown(main(sys.argv[1:]))
