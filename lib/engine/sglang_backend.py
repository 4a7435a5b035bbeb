"""Optional engine backend: sglang's model runner, in-process, inside the engine-only ranks.

Pinned to sglang 0.5.23 (patches/sglang). That release already captures EAGLE-3 aux hidden states
without a draft (`enable_return_aux_hidden_states`): for requests asking for full hidden states the
logits processor returns the aux layers' outputs, concatenated, as `hidden_states` and the post-norm
last layer as `last_hidden_states`, every token. What it lacks is a way to live in a bigger
torch.distributed world: it builds its groups over every rank, which would drag the trainers in.
patches/sglang/external_world.patch adds `set_external_world_ranks`, so sglang's world is exactly
this engine's TP group (local synchronization, nobody else joins).

Not exercised on the lent GPU machines: their image pins torch 2.11 and sglang 0.5.23 needs its own
torch build. docs/engine.md says what was and was not run.
"""
from __future__ import annotations

import importlib.metadata
import os
import socket
from array import array
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist

from lib.data.batch import PackedBatch
from lib.config import EngineConfig, TargetConfig
from lib.drafts.base import CapturePlan, default_capture_plan
from lib.engine.base import (
    RANDOM_INIT_SEED,
    EngineInputError,
    capture_destination,
    check_batch_structure,
    find_sample_problems,
)
from lib.engine.tp import TensorParallel
from lib.target.shape import resolve_dtype

SGLANG_VERSION = "0.5.23"
INSTALL_HINT = f"pip install sglang=={SGLANG_VERSION}; bash patches/sglang/apply.sh"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def check_sglang_ready() -> None:
    """sglang of the pinned release, with our patch applied, or an error that says how to get there."""
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"engine.backend=sglang needs sglang, which is not installed: {INSTALL_HINT}") from None
    if version != SGLANG_VERSION:
        raise RuntimeError(f"engine.backend=sglang is pinned to sglang {SGLANG_VERSION}, found {version}: {INSTALL_HINT}")
    from sglang.srt.distributed import parallel_state

    if not hasattr(parallel_state, "set_external_world_ranks"):
        raise RuntimeError("sglang is installed but not patched for this project: bash patches/sglang/apply.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoPrefixCache(SimpleNamespace):
    """The tree cache a prefill-only runner needs: allocation only, nothing shared or kept."""

    def supports_swa(self) -> bool:
        return False

    def supports_mamba(self) -> bool:
        return False

    def supports_prefix_sharing(self) -> bool:
        return True

    def evict(self, params) -> None:
        pass

    def maybe_hand_to_session(self, req) -> None:
        pass


class SGLangBackend:
    """sglang ModelRunner with EAGLE-3 capture; every TP member returns only its own batch's rows."""

    def __init__(self) -> None:
        self._runner = None

    def load(
        self,
        target: TargetConfig,
        engine: EngineConfig,
        device: torch.device,
        tp_group: Optional[dist.ProcessGroup] = None,
        plan: Optional[CapturePlan] = None,
    ) -> None:
        check_sglang_ready()
        if device.type != "cuda":
            raise ValueError("engine.backend=sglang runs on CUDA only; use engine.backend=hf on CPU")
        if not target.path or not os.path.isfile(os.path.join(target.path, "config.json")):
            raise ValueError(
                f"engine.backend=sglang needs target.path with a config.json (got {target.path!r}); "
                "random weights come from target.random_init=true on top of that config"
            )
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(target.path)
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.dtype = resolve_dtype(target.dtype, self.device)
        self.hidden_size = int(hf_config.hidden_size)
        self.num_layers = int(hf_config.num_hidden_layers)
        self.vocab_size = int(hf_config.vocab_size)
        self.plan = plan if plan is not None else default_capture_plan(target, hf_config)
        self.plan.check_target(self.num_layers, self.hidden_size)
        if not self.plan.layers or not self.plan.final_hidden:
            raise ValueError("engine.backend=sglang captures aux layers and the final hidden state together; "
                             "a capture plan without either needs engine.backend=hf")
        self.aux_layers = list(self.plan.layers)
        self.token_budget = engine.token_budget
        # sglang captures each layer once, in layer order; map our (maybe repeated) list onto that.
        self._sglang_layers = sorted(set(self.aux_layers))
        self._columns = [self._sglang_layers.index(layer) for layer in self.aux_layers]

        group_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        if engine.tp != group_size:
            raise ValueError(f"engine.tp={engine.tp} but the TP group passed to the engine has {group_size} members")
        self._tp = TensorParallel(tp_group, self.device) if group_size > 1 else None
        if dist.is_initialized():
            ranks = dist.get_process_group_ranks(tp_group) if tp_group is not None else [dist.get_rank()]
            tp_rank = ranks.index(dist.get_rank())
        else:
            ranks, tp_rank = None, 0
        fraction = torch.cuda.get_per_process_memory_fraction(self.device)
        if not 0.0 < fraction < 1.0:
            raise RuntimeError(f"the CUDA memory fraction of {self.device} is {fraction}; cap it before loading the sglang "
                               "backend (train.py does, through lib/launch/runtime.py cap_process_memory)")
        self._runner = self._start_runner(target, group_size * self.token_budget, fraction, ranks, tp_rank)

    def _start_runner(self, target: TargetConfig, max_tokens: int, fraction: float, ranks, tp_rank: int):
        """The steps sglang's own one-batch benchmark takes, minus the scheduler and CUDA graphs."""
        from sglang.srt.arg_groups.model_override_base import resolving_view
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import bootstrap, parallel_state
        from sglang.srt.entrypoints.engine import _set_envs_and_config
        from sglang.srt.layers.moe import initialize_moe_config
        from sglang.srt.layers.quantization.fp4_utils import initialize_fp4_gemm_config
        from sglang.srt.layers.quantization.fp8_utils import initialize_fp8_gemm_config
        from sglang.srt.layers.quantization.unquant import initialize_bf16_gemm_config
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.runtime_context import SpawnRanks, get_device, publish
        from sglang.srt.server_args import ServerArgs

        server_args = ServerArgs(
            model_path=target.path,
            tp_size=len(ranks) if ranks else 1,
            dtype=_DTYPE_NAMES[self.dtype],
            load_format="dummy" if target.random_init else "auto",
            random_seed=RANDOM_INIT_SEED,
            mem_fraction_static=fraction,
            max_total_tokens=max_tokens,
            max_prefill_tokens=max_tokens,
            chunked_prefill_size=max_tokens,
            disable_radix_cache=True,
            disable_cuda_graph=True,
            skip_tokenizer_init=True,
            enable_return_aux_hidden_states=True,
            speculative_algorithm="EAGLE3",
            return_aux_hidden_state_layer_ids=self._sglang_layers,
            base_gpu_id=0,
        )
        server_args.resolve_once()
        _set_envs_and_config(server_args)
        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=tp_rank, gpu_id=self.device.index))
        initialize_moe_config()
        initialize_fp8_gemm_config()
        initialize_bf16_gemm_config()
        initialize_fp4_gemm_config()
        parallel_state.set_external_world_ranks(ranks)
        model_config = ModelConfig.from_server_args(server_args)
        port = _free_port()
        bootstrap.init_parallel_runtime(server_args=server_args, device=get_device().device, dist_port=port)
        bootstrap.init_layer_runtime(model_config=model_config)
        runner = ModelRunner(
            model_config=model_config,
            mem_fraction_static=resolving_view(server_args).mem_fraction_static,
            gpu_id=self.device.index,
            nccl_port=port,
            server_args=server_args,
        )
        runner.alloc_memory_pool()
        runner.init_attention_backends()
        return runner

    def capture(self, batch: PackedBatch, out: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        if self._runner is None:
            raise RuntimeError("SGLangBackend.capture called before load()")
        check_batch_structure(batch)
        problems = find_sample_problems(batch, self.vocab_size, self.token_budget)
        if self._tp is not None:
            ids, _, lengths, rows = self._tp.gather(batch, problems)
            ids = ids.cpu()
        else:
            if problems:
                raise EngineInputError(problems)
            ids, lengths, rows = batch.input_ids, batch.lengths, slice(0, batch.num_tokens)
        dst = capture_destination(out, batch.num_tokens, self.plan, self.dtype, self.device)
        if ids.numel() == 0:
            return dst
        aux, final = self._prefill(ids, lengths)
        if self._columns == list(range(len(self._sglang_layers))):
            dst["aux_hidden"].copy_(aux[rows])
        else:
            h = self.hidden_size
            for k, c in enumerate(self._columns):
                dst["aux_hidden"][:, k * h:(k + 1) * h].copy_(aux[rows, c * h:(c + 1) * h])
        dst["final_hidden"].copy_(final[rows])
        return dst

    @torch.no_grad()
    def _prefill(self, ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One prefill over all samples; returns ([T, n_unique*H] aux, [T, H] post-norm final)."""
        from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.runtime_context import get_schedule
        from sglang.srt.sampling.sampling_params import SamplingParams
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        runner = self._runner
        reqs, start = [], 0
        for i, n in enumerate(lengths):
            req = Req(
                rid=str(i),
                origin_input_text="",
                origin_input_ids=array("q", ids[start:start + n].tolist()),
                sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
                return_hidden_states=True,
            )
            req.full_untruncated_fill_ids = req.origin_input_ids
            req.logprob_start_len = -1
            req.extend_end = n
            reqs.append(req)
            start += n
        cache = _NoPrefixCache(page_size=get_schedule().page_size, device=runner.device,
                               token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator)
        try:
            sched = ScheduleBatch.init_new(
                reqs=reqs,
                req_to_token_pool=runner.req_to_token_pool,
                token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
                tree_cache=cache,
                model_config=runner.model_config,
                enable_overlap=False,
                spec_algorithm=SpeculativeAlgorithm.NONE,
            )
            sched.prepare_for_extend()
            if sched.input_ids is None and getattr(sched, "prefill_input_ids_cpu", None) is not None:
                sched.input_ids = sched.prefill_input_ids_cpu.to(sched.device, non_blocking=True)
                sched.prefill_input_ids_cpu = None
            forward = ForwardBatch.init_new(sched, runner, return_hidden_states_before_norm=False)
            output = runner.forward(forward).logits_output
            if output.hidden_states is None or output.last_hidden_states is None:
                raise RuntimeError(
                    f"sglang {SGLANG_VERSION} returned no aux/last hidden states; is the target architecture one "
                    "with EAGLE-3 capture in sglang (set_eagle3_layers_to_capture)?"
                )
            return output.hidden_states, output.last_hidden_states
        finally:
            # Prefill only: nothing is decoded later, so every KV slot is free again after the step.
            runner.req_to_token_pool.clear()
            runner.token_to_kv_pool_allocator.clear()
