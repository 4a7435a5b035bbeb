"""The P-EAGLE draft: EAGLE-3's draft with a stack of layers and a learned mask state, drafting k tokens
from one forward.

P-EAGLE (speculators 0.9.0, models/peagle/) keeps EAGLE-3's inputs: a slot pairs the target's aux states
at position p with the token after p, fc fuses the aux states, and the first layer reads
cat(norm(embedding), norm(hidden)). To draft k tokens at once, k-1 "mask" slots follow the newest slot,
at the next positions; each reads the mask token's embedding and a learned aux state (`mask_hidden`,
fused by the same fc) in place of a target state. A slot attends to the real slots up to its anchor
(the newest slot when serving) and to the mask slots of its own chain before it, so the newest slot
proposes token 1 and mask slot j token j+1, all in one forward.

The module is `Eagle3Draft` (embedding, fc and fc_norm, rope, final norm, lm_head over the draft
vocabulary with d2t/t2d, and its first decoder layer) with the layer held as `layers.0` and more
Llama decoder layers after it (`layers.1..`), under speculators' state-dict names, so export is a plain
write. `norm_before_residual` (speculators' training default) makes the first layer's residual the
normed fc output rather than the raw one. How the slots are attended is the caller's: training
(lib/drafts/peagle/attention.py) and the drafter (drafter.py) pass their own `attend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lib.drafts.eagle3.model import DraftDecoderLayer, Eagle3Draft, Eagle3DraftConfig

# attend(layer index, q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D]) -> attention output [..., Hq, D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PEagleDraftConfig(Eagle3DraftConfig):
    num_hidden_layers: int = 1
    mask_token_id: int = 0  # the token every mask slot reads (speculators' / vLLM's mask_token_id, pard_token)
    num_depths: int = 8  # k: tokens one forward drafts (the newest slot plus k-1 mask slots)
    norm_before_residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_hidden_layers", "num_depths"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PEagleDraftConfig.{name}={value!r} must be an integer >= 1")
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"PEagleDraftConfig.mask_token_id={self.mask_token_id!r} must be a token id in "
                             f"[0, {self.vocab_size}): set draft.options.mask_token_id")
        if not isinstance(self.norm_before_residual, bool):
            raise ValueError(f"PEagleDraftConfig.norm_before_residual={self.norm_before_residual!r} must be a bool")


class StackLayer(DraftDecoderLayer):
    """A Llama decoder layer after the first: q/k/v read the H-wide normed hidden (no embedding half)."""

    def __init__(self, config: PEagleDraftConfig):
        super().__init__(config)
        del self.hidden_norm
        attn, width = self.self_attn, config.hidden_size
        attn.q_proj = nn.Linear(width, attn.num_heads * attn.head_dim, bias=False)
        attn.k_proj = nn.Linear(width, attn.num_kv_heads * attn.head_dim, bias=False)
        attn.v_proj = nn.Linear(width, attn.num_kv_heads * attn.head_dim, bias=False)

    def attention_inputs(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # type: ignore[override]
        return self.self_attn.project(self.input_layernorm(hidden), cos, sin)


class PEagleDraft(Eagle3Draft):
    config: PEagleDraftConfig

    def __init__(self, config: PEagleDraftConfig):
        super().__init__(config)
        first = self.midlayer
        del self.midlayer  # held as layers.0, speculators' (and vLLM's) name
        self.layers = nn.ModuleList([first, *(StackLayer(config) for _ in range(config.num_hidden_layers - 1))])
        # The aux state every mask slot reads, before fc_norm and fc, as speculators stores it.
        self.mask_hidden = nn.Parameter(torch.empty(1, 1, config.fc_in_features))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Eagle3Draft's initialisation for the layers; mask_hidden ~ N(0, 1) (speculators' torch.randn)."""
        super().reset_parameters(std)
        if hasattr(self, "mask_hidden"):
            with torch.no_grad():
                self.mask_hidden.normal_(0.0, 1.0)

    def mask_state(self) -> torch.Tensor:
        """[H]: mask_hidden through fc_norm and fc, the hidden every mask slot starts from."""
        return self.project_hidden(self.mask_hidden.view(1, -1))[0]

    def slot_hidden(self, aux: torch.Tensor, masks: int) -> torch.Tensor:
        """[..., S + masks, H]: the real slots' fused aux states [..., S, n_aux*H] followed by `masks` mask slots."""
        real = self.project_hidden(aux)
        fill = self.mask_state().to(real.dtype).expand(*real.shape[:-2], masks, real.shape[-1])
        return torch.cat([real, fill], dim=-2)

    def run_layers(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, attend: Attend
                   ) -> torch.Tensor:
        """The layer stack over slots ids/positions [...], hidden [..., H]; returns the pre-norm output hidden."""
        cos, sin = self.rope(positions, hidden.dtype)
        first = self.layers[0]
        q, k, v = first.attention_inputs(self.embed(ids), hidden, cos, sin)
        residual = first.hidden_norm(hidden) if self.config.norm_before_residual else hidden
        h = first.finish(attend(0, q, k, v), residual)
        for index, layer in enumerate(self.layers[1:], start=1):
            q, k, v = layer.attention_inputs(h, cos, sin)
            h = layer.finish(attend(index, q, k, v), h)
        return h

    def forward(self, ids: torch.Tensor, aux_hidden: torch.Tensor, positions: torch.Tensor, attend: Attend,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training's forward over the sampled slots of a packed batch (lib/drafts/peagle/sampling.py):
        ids, positions [N]; aux_hidden [T, n_aux*H] for the T real slots, which come first (the N - T
        after them are mask slots). A module forward, so FSDP's hooks gather the parameters. Returns the
        pre-norm output hidden of `rows` (all slots when None)."""
        hidden = self.slot_hidden(aux_hidden, ids.shape[0] - aux_hidden.shape[0])
        out = self.run_layers(ids, hidden, positions, attend)
        return out if rows is None else out[rows]

    def forward_infer(self, *args, **kwargs):
        raise TypeError("PEagleDraft has no chain step: draft with lib.drafts.peagle.drafter.PEagleDrafter")
