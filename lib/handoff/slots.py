"""Slot layout and slot stores: where the K payload slots of the handoff ring live.

A slot is one run of bytes holding one region per TensorSpec, each `max_bytes` long and aligned to
256 bytes, so every tensor is a plain view of the slot and a step's payload is written in place.
Stores differ only in where the bytes live and how the two processes order their accesses:
- ShmSlotStore: a file in /dev/shm mapped by both processes; the control messages order accesses.
- CudaIpcSlotStore: one cudaMalloc'd buffer exported once by CUDA IPC, with one interprocess
  "written" and one "consumed" event per slot, so neither side ever synchronizes the host.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import secrets
import tempfile
from dataclasses import dataclass, field

import torch

from lib.data.batch import TensorSpec

ALIGN_BYTES = 256


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def describe_spec(spec: TensorSpec) -> dict:
    return {"name": spec.name, "dtype": str(spec.dtype).removeprefix("torch."),
            "row_shape": list(spec.row_shape), "max_rows": spec.max_rows}


def format_specs(described: list[dict]) -> str:
    return "[" + ", ".join(f"{d['name']}: {d['dtype']} rows<={d['max_rows']} x {tuple(d['row_shape'])}" for d in described) + "]"


@dataclass(frozen=True)
class SlotLayout:
    """Byte offsets of each spec's region inside one slot."""

    specs: tuple[TensorSpec, ...]
    offsets: tuple[int, ...] = field(init=False)
    slot_bytes: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "specs", tuple(self.specs))
        if not self.specs:
            raise ValueError("handoff specs are empty: pass at least one TensorSpec "
                             "(the draft strategy's payload_specs(plan, token_budget, dtype))")
        seen: set[str] = set()
        for spec in self.specs:
            if not isinstance(spec, TensorSpec):
                raise TypeError(f"handoff spec {spec!r} is not a lib.data.batch.TensorSpec")
            if not spec.name or spec.name in seen:
                raise ValueError(f"handoff spec name {spec.name!r} is empty or repeated; give every tensor a unique name")
            seen.add(spec.name)
            if spec.max_rows < 1 or any(int(d) < 1 for d in spec.row_shape):
                raise ValueError(f"handoff spec {spec.name!r}: max_rows={spec.max_rows}, row_shape={spec.row_shape}; all sizes must be >= 1")
        offsets, at = [], 0
        for spec in self.specs:
            offsets.append(at)
            at += _align(spec.max_bytes)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "slot_bytes", at)

    @property
    def max_rows(self) -> int:
        return min(spec.max_rows for spec in self.specs)

    def views(self, flat: torch.Tensor, slot: int) -> dict[str, torch.Tensor]:
        base = slot * self.slot_bytes
        out = {}
        for spec, offset in zip(self.specs, self.offsets):
            region = flat[base + offset: base + offset + spec.max_bytes]
            out[spec.name] = region.view(spec.dtype).view(spec.max_rows, *spec.row_shape)
        return out

    def num_rows(self, header: dict) -> int:
        if not isinstance(header, dict) or "num_rows" not in header:
            raise ValueError(f"handoff header {header!r} must be a dict with an int 'num_rows' (rows of this step)")
        n = header["num_rows"]
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.max_rows:
            raise ValueError(f"handoff header num_rows={n!r} must be an int in [0, {self.max_rows}] (the specs' max_rows)")
        return n

    def write(self, slot_views: dict[str, torch.Tensor], payload: dict[str, torch.Tensor], num_rows: int) -> None:
        """Copy payload tensors into the slot, except those that already are the slot's own views."""
        if set(payload) != set(slot_views):
            raise ValueError(f"handoff payload keys {sorted(payload)} differ from the specs {sorted(slot_views)}; send exactly one tensor per spec")
        for spec in self.specs:
            dst, src = slot_views[spec.name], payload[spec.name]
            if not isinstance(src, torch.Tensor):
                raise TypeError(f"handoff payload[{spec.name!r}] is {type(src).__name__}, not a tensor")
            if src.dtype != spec.dtype or tuple(src.shape[1:]) != tuple(spec.row_shape):
                raise ValueError(f"handoff payload[{spec.name!r}] has dtype {src.dtype} and shape {tuple(src.shape)}; "
                                 f"the spec wants {spec.dtype} and ({num_rows}, *{tuple(spec.row_shape)})")
            if src.device == dst.device and src.data_ptr() == dst.data_ptr():
                if src.shape[0] < num_rows or not src.is_contiguous():
                    raise ValueError(f"handoff payload[{spec.name!r}] is a view of the slot with {src.shape[0]} rows "
                                     f"(contiguous={src.is_contiguous()}); pass a contiguous view with at least num_rows={num_rows} rows")
                continue  # written in place by the engine: zero copy
            if src.shape[0] != num_rows:
                raise ValueError(f"handoff payload[{spec.name!r}] has {src.shape[0]} rows but header num_rows={num_rows}; they must match")
            dst[:num_rows].copy_(src, non_blocking=True)


def trim(views: dict[str, torch.Tensor], num_rows: int) -> dict[str, torch.Tensor]:
    return {name: v[:num_rows] for name, v in views.items()}


def describe_device(device: torch.device) -> dict:
    if device.type == "cpu":
        return {"type": "cpu"}
    if device.type != "cuda":
        raise ValueError(f"handoff device {device} is not supported; use cpu or cuda")
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "uuid": str(props.uuid), "name": props.name}


def normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class ShmSlotStore:
    """Slots in a /dev/shm file; the name is unlinked as soon as the receiver has mapped it."""

    copies_on_receive = False

    def __init__(self, flat: torch.Tensor, layout: SlotLayout, slots: int, path: str | None):
        self._flat = flat
        self._views = [layout.views(flat, k) for k in range(slots)]
        self._path = path  # set on the creating side until the name is unlinked

    @classmethod
    def create(cls, layout: SlotLayout, slots: int) -> "ShmSlotStore":
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(root, f"specdraft-handoff-{os.getpid()}-{secrets.token_hex(6)}")
        size = layout.slot_bytes * slots
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            flat = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        except BaseException:
            os.unlink(path)
            raise
        return cls(flat, layout, slots, path)

    @classmethod
    def open(cls, exported: dict, layout: SlotLayout, slots: int) -> "ShmSlotStore":
        size = layout.slot_bytes * slots
        actual = os.path.getsize(exported["path"])
        if actual != size:
            raise ValueError(f"handoff shared memory {exported['path']} holds {actual} bytes, expected {size}")
        return cls(torch.from_file(exported["path"], shared=True, size=size, dtype=torch.uint8), layout, slots, None)

    def export(self) -> dict:
        return {"kind": "shm", "path": self._path}

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return self._views[slot]

    def before_write(self, slot: int) -> None:
        pass  # the credit message already proves the receiver is done with the slot

    def after_write(self, slot: int) -> None:
        pass

    def receive(self, slot: int, num_rows: int) -> dict[str, torch.Tensor]:
        return trim(self._views[slot], num_rows)

    def before_release(self, slot: int) -> None:
        pass

    def peer_opened(self) -> None:
        # Both sides hold the mapping now; without a name nothing is left behind if either crashes.
        if self._path is not None:
            os.unlink(self._path)
            self._path = None

    def close(self) -> None:
        self.peer_opened()
        self._views, self._flat = [], None


@contextlib.contextmanager
def _expandable_segments_off():
    """Allocate with plain cudaMalloc: IPC export of expandable segments is not portable across versions."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    current = (getter() if getter else "") + "," + os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    was_on = "expandable_segments:true" in current.replace(" ", "").lower()
    if was_on:
        setter("expandable_segments:False")
    try:
        yield
    finally:
        if was_on:
            setter("expandable_segments:True")


def _local_cuda_index(uuid: str) -> int:
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid:
            return index
    raise ValueError(f"handoff: the engine's GPU {uuid} is not visible in this process "
                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); make it visible to both processes of the pair")


def _rebuild_args():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    return rebuild_cuda_tensor, list(inspect.signature(rebuild_cuda_tensor).parameters).index("storage_device")


class CudaIpcSlotStore:
    """Slots in one CUDA buffer owned by the sender and mapped once by the receiver.

    Same GPU: the receiver uses the slot in place. Another GPU (cross_device): the receiver copies the
    slot to its own device on a stream of the sender's GPU and gives the slot back right after.
    """

    def __init__(self, flat: torch.Tensor, layout: SlotLayout, slots: int, device: torch.device,
                 written: list, consumed: list, copy_stream: torch.cuda.Stream | None):
        self._flat = flat
        self._layout = layout
        self._views = [layout.views(flat, k) for k in range(slots)]
        self._device = device
        self._written, self._consumed = written, consumed
        self._copy_stream = copy_stream
        self.copies_on_receive = copy_stream is not None

    @classmethod
    def create(cls, layout: SlotLayout, slots: int, device: torch.device) -> "CudaIpcSlotStore":
        with torch.cuda.device(device):
            with _expandable_segments_off():
                flat = torch.empty(slots * layout.slot_bytes, dtype=torch.uint8, device=device)
            written = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
            consumed = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
            for event in written + consumed:
                event.ipc_handle()  # creates the event on this device now, not at first record
        return cls(flat, layout, slots, device, written, consumed, None)

    @classmethod
    def open(cls, exported: dict, layout: SlotLayout, slots: int, device: torch.device, cross_device: bool) -> "CudaIpcSlotStore":
        source = _local_cuda_index(exported["uuid"])
        rebuild, device_arg = _rebuild_args()
        args = list(exported["tensor"])
        args[device_arg] = source  # the sender's index may differ here (CUDA_VISIBLE_DEVICES)
        with torch.cuda.device(source):
            flat = rebuild(*args)
            written = [torch.cuda.Event.from_ipc_handle(source, h) for h in exported["written"]]
            consumed = [torch.cuda.Event.from_ipc_handle(source, h) for h in exported["consumed"]]
            copy_stream = torch.cuda.Stream(device=source) if cross_device else None
        if flat.numel() != slots * layout.slot_bytes:
            raise ValueError(f"handoff CUDA buffer holds {flat.numel()} bytes, expected {slots * layout.slot_bytes}")
        return cls(flat, layout, slots, device, written, consumed, copy_stream)

    def export(self) -> dict:
        from torch.multiprocessing.reductions import reduce_tensor
        _, args = reduce_tensor(self._flat)
        return {"kind": "cuda_ipc", "uuid": str(torch.cuda.get_device_properties(self._device).uuid), "tensor": args,
                "written": [e.ipc_handle() for e in self._written], "consumed": [e.ipc_handle() for e in self._consumed]}

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return self._views[slot]

    def before_write(self, slot: int) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._consumed[slot])

    def after_write(self, slot: int) -> None:
        self._written[slot].record(torch.cuda.current_stream(self._device))

    def receive(self, slot: int, num_rows: int) -> dict[str, torch.Tensor]:
        here = torch.cuda.current_stream(self._device)
        if self._copy_stream is None:
            here.wait_event(self._written[slot])
            return trim(self._views[slot], num_rows)
        # Allocate on this side's stream so freed blocks are reused in this stream's order.
        out = {name: torch.empty((num_rows, *v.shape[1:]), dtype=v.dtype, device=self._device) for name, v in self._views[slot].items()}
        stream = self._copy_stream
        stream.wait_stream(here)
        stream.wait_event(self._written[slot])
        with torch.cuda.stream(stream):
            for name, v in self._views[slot].items():
                out[name].copy_(v[:num_rows], non_blocking=True)
            self._consumed[slot].record(stream)
            copied = torch.cuda.Event()
            copied.record(stream)
        here.wait_event(copied)
        return out

    def before_release(self, slot: int) -> None:
        if self._copy_stream is None:
            self._consumed[slot].record(torch.cuda.current_stream(self._device))

    def peer_opened(self) -> None:
        pass

    def close(self) -> None:
        if self._flat is None:
            return
        # Kernels still reading or writing the slots must finish before the mapping goes away.
        torch.cuda.synchronize(self._flat.device)
        torch.cuda.synchronize(self._device)
        self._views, self._flat = [], None
        self._written, self._consumed, self._copy_stream = [], [], None
        # The sender's buffer waits in torch's IPC limbo until the receiver's references are gone;
        # collect it now that the receiver has closed, instead of at exit.
        torch.cuda.ipc_collect()


def create_store(layout: SlotLayout, slots: int, device: torch.device):
    if device.type == "cuda":
        return CudaIpcSlotStore.create(layout, slots, device)
    return ShmSlotStore.create(layout, slots)


def open_store(exported: dict, layout: SlotLayout, slots: int, device: torch.device, cross_device: bool):
    if exported["kind"] == "cuda_ipc":
        return CudaIpcSlotStore.open(exported, layout, slots, device, cross_device)
    return ShmSlotStore.open(exported, layout, slots)
