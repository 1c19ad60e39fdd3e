"""The end-of-run telemetry summary: every process's figures (`Monitor.summary`) in one block, for
`results.json`, `run.json`, the report and the log."""

from __future__ import annotations

from typing import Any

GiB = 2**30


def combine(processes: list[dict[str, Any]], *, role: str) -> dict[str, Any]:
    """One block for a training run or an eval: processes sorted by rank, all their warnings, and a note
    when no GPU was sampled (so the report says that utilisation is missing, not that it was zero)."""
    procs = sorted(processes, key=lambda p: (str(p.get("node")), _rank_key(p.get("rank"))))
    sources = sorted({p["source"] for p in procs if p.get("source")})
    out: dict[str, Any] = {"role": role, "source": ",".join(sources) or None, "processes": procs,
                           "warnings": [w for p in procs for w in p.get("warnings", [])]}
    if not any(p.get("gpus") for p in procs):
        out["note"] = ("no GPU telemetry: NVML found no GPU on these workers (a CPU run), or telemetry.nvml is "
                       "off; only process memory was measured")
    elif "fake" in sources:
        out["note"] = "GPU figures come from the fake NVML provider (FJORDTUNE_FAKE_NVML): a test, not a GPU"
    return out


def _rank_key(rank: Any) -> tuple[int, str]:
    s = str(rank)
    return (int(s), "") if s.isdigit() else (1 << 30, s)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _gib(n: int | float | None) -> str:
    return "-" if not n else f"{n / GiB:.2f}"


def markdown(block: dict[str, Any] | None, *, title: str) -> str:
    """A Markdown table, one row per GPU (or per process where none was sampled), and the warnings."""
    if not block:
        return ""
    lines = [f"### {title}", ""]
    procs = block.get("processes", [])
    if block.get("note"):
        lines += [f"_{block['note']}_", ""]
    rows = []
    for p in procs:
        peak, pred = p.get("process_peak_bytes"), p.get("predicted_peak_bytes")
        mem = f"{_gib(peak)}" + (f" / {_gib(pred)}" if pred else "")
        for g in p.get("gpus") or [None]:
            if g is None:
                rows.append(f"| {p['rank']} | {p['node']} | - | - | - | - | - | - | {mem} |")
                continue
            rows.append(f"| {p['rank']} | {p['node']} | {g['gpu']} | {_pct(g['utilization_mean_pct'])} | "
                        f"{_pct(g['utilization_p5_pct'])} | {_pct(g['utilization_p95_pct'])} | "
                        f"{g['longest_idle_s']:.0f} | {_gib(g['memory_peak_bytes'])} / {_gib(g['memory_total_bytes'])} | "
                        f"{mem} |")
    phase = next((g["phase"] for p in procs for g in p.get("gpus", [])), None)
    lines += [f"| rank | node | GPU | util mean{f' ({phase})' if phase else ''} | p5 | p95 | longest idle (s) | "
              "GPU memory peak / total (GiB) | process peak / predicted (GiB) |",
              "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if block.get("warnings"):
        lines += ["Warnings:", ""] + [f"- {w}" for w in block["warnings"]] + [""]
    return "\n".join(lines)


def log_lines(block: dict[str, Any] | None) -> list[str]:
    """Short lines for the job log: utilisation and memory per GPU, then the warnings."""
    if not block:
        return []
    out = []
    for p in block.get("processes", []):
        pred = p.get("predicted_peak_bytes")
        mem = f"process peak {_gib(p.get('process_peak_bytes'))} GiB" + (f" (predicted {_gib(pred)})" if pred else "")
        if not p.get("gpus"):
            out.append(f"telemetry {p['role']} rank {p['rank']}: no GPU sampled; {mem}")
        for g in p.get("gpus", []):
            out.append(f"telemetry {p['role']} rank {p['rank']} GPU {g['gpu']}: utilisation during {g['phase']} "
                       f"mean {_pct(g['utilization_mean_pct'])} p5 {_pct(g['utilization_p5_pct'])} "
                       f"p95 {_pct(g['utilization_p95_pct'])}; GPU memory peak {_gib(g['memory_peak_bytes'])} of "
                       f"{_gib(g['memory_total_bytes'])} GiB; {mem}")
    out += [f"telemetry warning: {w}" for w in block.get("warnings", [])]
    return out


def headline(block: dict[str, Any], *, label: str) -> str:
    """One line for the end of a run: how busy the GPUs were while working, the memory peak, and the
    warnings (listed below it), or that no GPU was sampled."""
    procs = block.get("processes", [])
    gpus = [g for p in procs for g in p.get("gpus", [])]
    peak = max((p.get("process_peak_bytes") or 0 for p in procs), default=0)
    pred = max((p.get("predicted_peak_bytes") or 0 for p in procs), default=0)
    mem = f"process peak {_gib(peak)} GiB" + (f" (predicted {_gib(pred)})" if pred else "")
    warnings = block.get("warnings", [])
    tail = "".join(f"\n  warning: {w}" for w in warnings)
    if not gpus:
        return f"telemetry {label}: {len(procs)} process(es), no GPU sampled; {mem}{tail}"
    means = [g["utilization_mean_pct"] for g in gpus if g["utilization_mean_pct"] is not None]
    util = (f"utilisation during {gpus[0]['phase']} {min(means):.0f}-{max(means):.0f}% (mean per GPU)" if means
            else "no working-phase sample")
    fake = " [fake NVML]" if block.get("source") == "fake" else ""
    return (f"telemetry {label}: {len(gpus)} GPU(s){fake}, {util}; {mem}; "
            f"{len(warnings) or 'no'} warning(s){tail}")
