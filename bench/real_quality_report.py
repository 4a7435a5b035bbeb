"""Tables of bench/real_quality.sh's results, as Markdown for docs/benchmarks.md.

    python bench/real_quality_report.py outputs/real_quality > report.md

Reads what the phases left in the work directory: family/{eagle3,dflash}_eval.json (eval.py's JSON,
with per-category rows), family/family_ab_{eagle3,dflash}.json (steps, training seconds), curve/
metrics.jsonl (online evaluation rows), data.log (regeneration rates) and train.jsonl (cut-off answers).
A phase that did not run is left out.
"""
from __future__ import annotations

import json
import os
import re
import sys

FAMILIES = ("eagle3", "eagle3_1", "eagle3_lk", "eagle3_lk_hybrid", "eagle3_tv", "eagle3_jsd", "peagle", "dflash", "dflash_dpace",
            "dspark", "dflash2")  # bench/family_ab.py's phases, in table order (missing ones are left out)


def _load(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def family_rows(work: str) -> list[str]:
    out = ["| draft | steps | train s | k | tau (tokens per target forward) | acceptance per position | "
           "matches greedy |", "|---|---|---|---|---|---|---|"]
    for name in FAMILIES:
        ev = _load(os.path.join(work, "family", f"{name}_eval.json"))
        run = (_load(os.path.join(work, "family", f"family_ab_{name}.json")) or {}).get(name) or {}
        for r in (ev or {}).get("results", []):
            rates = " ".join(f"{a:.2f}" for a in r["accept_rates"])
            greedy = str(r.get("matches_greedy"))
            if r.get("max_greedy_margin") is not None:  # where outputs parted from greedy: the widest logit gap
                greedy += f" (margin <= {r['max_greedy_margin']:.2f})"
            out.append(f"| {name} | {run.get('steps', '?')} | {run.get('train_s', 0):.0f} | {r['k']} | "
                       f"**{r['tau']:.3f}** | {rates} | {greedy} |")
    return out if len(out) > 2 else []


def seen_rows(work: str) -> list[str]:
    """Each family's draft on its own training conversations (the `seen` phase) beside its held-out score."""
    out = ["| draft | k | tau on training prompts | acceptance per position | held-out tau |", "|---|---|---|---|---|"]
    for name in FAMILIES:
        seen = _load(os.path.join(work, f"seen_{name}.json"))
        held = {r["k"]: r for r in (_load(os.path.join(work, "family", f"{name}_eval.json")) or {}).get("results", [])}
        for r in (seen or {}).get("results", []):
            rates = " ".join(f"{a:.2f}" for a in r["accept_rates"])
            other = f"{held[r['k']]['tau']:.3f}" if r["k"] in held else "-"
            out.append(f"| {name} | {r['k']} | **{r['tau']:.3f}** | {rates} | {other} |")
    return out if len(out) > 2 else []


def fp32_rows(work: str) -> list[str]:
    """The `fp32` phase: EAGLE-3 with the target in float32, and whether its output equals greedy."""
    ev = _load(os.path.join(work, "fp32_eagle3.json"))
    out = ["| draft | target dtype | k | tau | matches greedy | prompts differing |", "|---|---|---|---|---|---|"]
    for r in (ev or {}).get("results", []):
        out.append(f"| eagle3 | {ev.get('dtype')} | {r['k']} | **{r['tau']:.3f}** | {r.get('matches_greedy')} | "
                   f"{len(r.get('mismatched_prompts') or [])} of {ev.get('num_prompts')} |")
    return out if len(out) > 2 else []


def training_rows(work: str) -> list[str]:
    """Median tokens/s and step time over each run's second half (compiling and warm-up left out)."""
    out = ["| draft | steps | median tokens/s (packed tokens, all trainers) | median step s |", "|---|---|---|---|"]
    for name in FAMILIES:
        path = os.path.join(work, "family", name, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = [r for r in map(json.loads, f) if "loss" in r]
        late = rows[len(rows) // 2:] or rows
        tps = sorted(r["tokens_per_s"] for r in late)
        step = sorted(r["step_time_s"] for r in late)
        out.append(f"| {name} | {len(rows)} | {tps[len(tps) // 2]:,.0f} | {step[len(step) // 2]:.3f} |")
    return out if len(out) > 2 else []


def category_rows(work: str) -> list[str]:
    columns, cells = [], {}
    for name in FAMILIES:
        ev = _load(os.path.join(work, "family", f"{name}_eval.json")) or {}
        for r in ev.get("results", []):
            col = f"{name} k={r['k']}"
            columns.append(col)
            for cat, row in (r.get("per_category") or {}).items():
                cells.setdefault(cat, {})[col] = row
            cells.setdefault("all", {})[col] = {"tau": r["tau"], "prompts": ev.get("num_prompts")}
    if len(cells) <= 1:
        return []
    out = ["| category | prompts | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for cat in sorted(cells, key=lambda c: (c == "all", c)):
        row = cells[cat]
        prompts = next((v.get("prompts") for v in row.values() if v.get("prompts") is not None), "?")
        out.append(f"| {cat} | {prompts} | " + " | ".join(
            f"{row[c]['tau']:.2f}" if c in row else "-" for c in columns) + " |")
    return out


def position_rows(work: str) -> list[str]:
    """tau by where the round starts in the answer (eval.py's by_answer_position), held-out and seen:
    whether a draft's acceptance climbs where the target starts looping."""
    entries = []
    for name in FAMILIES:
        for where, path in (("held-out", os.path.join(work, "family", f"{name}_eval.json")),
                            ("seen", os.path.join(work, f"seen_{name}.json"))):
            for r in (_load(path) or {}).get("results", []):
                if len(r.get("by_answer_position") or {}) > 1:
                    entries.append((name, where, r))
    spans = sorted({g for _, _, r in entries for g in r["by_answer_position"]}, key=lambda g: int(g.split("-")[0]))
    out = ["| draft | prompts | k | " + " | ".join(f"tau, tokens {g}" for g in spans) + " |",
           "|---" * (len(spans) + 3) + "|"]
    for name, where, r in entries:
        groups = r["by_answer_position"]
        out.append(f"| {name} | {where} | {r['k']} | " + " | ".join(
            f"{groups[g]['tau']:.2f} ({groups[g]['verify_rows']})" if g in groups else "-" for g in spans) + " |")
    return out if entries else []


def _curve_points(work: str) -> list[dict]:
    """{step, accept_len_k*} per point: eval.py's JSON per checkpoint, or a CURVE_RUN's online rows."""
    folder = os.path.join(work, "curve")
    files = [f for f in os.listdir(folder) if re.fullmatch(r"step-\d+\.json", f)] if os.path.isdir(folder) else []
    if files:
        points = []
        for name in sorted(files, key=lambda f: int(f[5:-5])):
            ev = _load(os.path.join(folder, name))
            points.append({"step": int(name[5:-5]), **{f"accept_len_k{r['k']}": r["tau"] for r in ev["results"]}})
        return points
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    return [r for r in rows if any(k.startswith("accept_len_k") for k in r)]


def curve_rows(work: str) -> list[str]:
    evals = _curve_points(work)
    keys = sorted({k for r in evals for k in r if k.startswith("accept_len_k")}, key=lambda k: int(k[12:]))
    out = ["| step | " + " | ".join(f"tau k={k[12:]}" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in evals:
        out.append(f"| {r.get('step')} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys) + " |")
    return out if evals else []


SWEEP = re.compile(r"batch (\d+)(?:, (\d+) processes)?: .*?(\d+) new tokens in ([\d.]+) s")


def sweep_rows(work: str) -> list[str]:
    """One row per (batch, processes): the processes' new tokens summed over the longest one's seconds."""
    path = os.path.join(work, "data.log")
    if not os.path.isfile(path):
        return []
    runs: dict[tuple[int, int], list[tuple[int, float]]] = {}
    with open(path) as f:
        for m in filter(None, map(SWEEP.search, f)):
            batch, procs, tokens, seconds = m.groups()
            runs.setdefault((int(batch), int(procs or 1)), []).append((int(tokens), float(seconds)))
    out = ["| batch | processes | new tokens | s | tokens/s |", "|---|---|---|---|---|"]
    for (batch, procs), parts in sorted(runs.items()):
        tokens, seconds = sum(t for t, _ in parts), max(s for _, s in parts)
        out.append(f"| {batch} | {procs} | {tokens} | {seconds:.1f} | **{tokens / max(seconds, 1e-9):.0f}** |")
    return out if runs else []


def data_line(work: str) -> list[str]:
    path = os.path.join(work, "train.jsonl")
    if not os.path.isfile(path):
        return []
    convs, answers, cut = 0, 0, 0
    with open(path) as f:
        for line in f:
            finish = json.loads(line).get("regenerated", {}).get("finish", [])
            convs, answers, cut = convs + 1, answers + len(finish), cut + finish.count("length")
    return [f"Training data: {convs} conversations, {answers} answers, {cut} cut off at the token limit "
            "(their end-of-turn left untrained)."]


def main(work: str) -> None:
    for title, rows in (("Data", data_line(work)), ("Same wall-clock, held-out real prompts", family_rows(work)),
                        ("Per category", category_rows(work)),
                        ("Drafts on their training prompts (seen) vs held-out", seen_rows(work)),
                        ("By where the round starts in the answer (tau, verify rows)", position_rows(work)),
                        ("EAGLE-3 with the target in float32", fp32_rows(work)),
                        ("Training speed", training_rows(work)), ("tau against steps (EAGLE-3)", curve_rows(work)),
                        ("Regeneration against the batch", sweep_rows(work))):
        if rows:
            print(f"### {title}\n")
            print("\n".join(rows) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python bench/real_quality_report.py WORK_DIR (bench/real_quality.sh's $WORK)")
    main(sys.argv[1])
