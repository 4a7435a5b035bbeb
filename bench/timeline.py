"""Where a profiled GPU sits idle: busy time, idle gaps and the host calls that wait, from a chrome trace.

write_profile (bench/trainer.py) appends this summary to its kernel table: when the measured time per
batch exceeds the kernels' busy time, the gaps say whether the host's launches or a synchronising call
(a device-to-host copy, a stream synchronize) left the GPU waiting.
"""
from __future__ import annotations

import json

_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_WAITING_CALLS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent", "cudaEventSynchronize")


def idle_summary(trace_path: str, largest: int = 8, min_gap_us: float = 5.0) -> str:
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    device = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "")) for e in events
                    if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATEGORIES)
    if not device:
        return "no device events in the trace\n"
    busy, gaps = 0.0, []
    start, end, last_name = device[0][0], device[0][1], device[0][2]
    for s, e, name in device[1:]:
        if s > end:
            busy += end - start
            if s - end >= min_gap_us:
                gaps.append((s - end, last_name, name))
            start = s
        if e > end:
            end, last_name = e, name
    busy += end - start
    span = max(e for _, e, _ in device) - device[0][0]
    waiting: dict[str, list[float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and any(w in name for w in _WAITING_CALLS):
            waiting.setdefault(name, []).append(e.get("dur", 0.0))
    lines = [f"GPU timeline: span {span / 1e3:.1f} ms, kernels busy {busy / 1e3:.1f} ms ({busy / span:.1%}), "
             f"{len(gaps)} gaps >= {min_gap_us:.0f} us totalling {sum(g for g, _, _ in gaps) / 1e3:.1f} ms"]
    for gap, before, after in sorted(gaps, reverse=True)[:largest]:
        lines.append(f"  gap {gap:8.1f} us  after {before[:60]}  before {after[:60]}")
    for name, durs in sorted(waiting.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  host {name}: {len(durs)} calls, {sum(durs) / 1e3:.2f} ms, longest {max(durs):.0f} us")
    return "\n".join(lines) + "\n"
