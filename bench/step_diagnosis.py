"""Where a GRPO step's time and memory go: the profile summary and the memory-snapshot summary of bench_step.py.

  profile_summary(prof)     from a torch.profiler run over one step: busy time per CUDA stream (kernels and copies
                            apart), the idle gaps of the compute stream (the stream with the most kernel time), the
                            host synchronisations and allocator calls (CUDA runtime events), the top kernels and the
                            top aten ops by CUDA time;
  snapshot_summary(snap)    from torch.cuda.memory._snapshot() taken after a step recorded with
                            torch.cuda.memory._record_memory_history: the peak of allocated bytes (replaying the
                            trace from what was allocated when recording began) and the live allocations at that
                            peak, largest first and grouped by their Python frames.
Both return text (bench_step.py writes it under --diagnose-dir).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

MIB = float(1 << 20)
GIB = float(1 << 30)
HOST_SYNCS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                        "cudaMemcpy2D", "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"})
ALLOCATOR_CALLS = frozenset({"cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost", "cudaMallocHost",
                             "cudaHostRegister", "cuMemCreate", "cuMemMap", "cuMemUnmap", "cuMemRelease"})
GPU_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _activity(event: Any) -> str:
    """kernel / gpu_memcpy / gpu_memset / cuda_runtime / cpu_op, from the event's device and name (torch 2.11's
    kineto events have no activity_type())."""
    if hasattr(event, "activity_type"):
        return str(event.activity_type()).lower().rsplit(".", 1)[-1]
    name = event.name()
    if "cuda" in str(event.device_type()).lower():
        if name.startswith("Memcpy") or name.startswith("memcpy"):
            return "gpu_memcpy"
        if name.startswith("Memset") or name.startswith("memset"):
            return "gpu_memset"
        return "kernel"
    if name.startswith(("cuda", "cu")) and not name.startswith("cutlass"):
        return "cuda_runtime"
    return "cpu_op"


class _Event:
    """The few fields used here, read once (kineto event accessors differ between torch versions)."""

    __slots__ = ("name", "kind", "start", "end", "stream")

    def __init__(self, event: Any) -> None:
        self.name = event.name()
        self.kind = _activity(event)
        self.start = event.start_ns()
        end = getattr(event, "end_ns", None)
        self.end = end() if callable(end) else self.start + event.duration_ns()
        stream = getattr(event, "device_resource_id", None)
        self.stream = stream() if callable(stream) else 0

    def duration(self) -> int:
        return self.end - self.start


def profile_summary(prof: Any, label: str, top: int = 20, with_ops: bool = True) -> str:
    events = [_Event(e) for e in prof.profiler.kineto_results.events()]
    gpu = [e for e in events if e.kind in GPU_ACTIVITIES]
    runtime = [e for e in events if e.kind in ("cuda_runtime", "cuda_driver")]
    lines = [f"== profile: {label} =="]
    if not gpu:
        return "\n".join(lines + ["no GPU events recorded"])
    window_start = min(e.start for e in gpu)
    window_end = max(e.end for e in gpu)
    lines.append(f"GPU window {(window_end - window_start) / 1e6:.1f} ms, {len(gpu)} GPU events, "
                 f"{len(runtime)} runtime calls")
    per_stream: dict[int, dict[str, list[tuple[int, int]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for e in gpu:
        name = e.name
        kind = e.kind
        if kind == "gpu_memcpy":
            kind = "memcpy " + ("DtoH" if "DtoH" in name else "HtoD" if "HtoD" in name else "DtoD/other")
        per_stream[e.stream][kind].append((e.start, e.end))
    compute = max(per_stream, key=lambda s: sum(b - a for a, b in per_stream[s].get("kernel", [])))
    lines.append("stream      kind                busy ms   count   (busy = union of intervals)")
    for stream, kinds in sorted(per_stream.items()):
        for kind, intervals in sorted(kinds.items()):
            tag = " <- compute" if stream == compute and kind == "kernel" else ""
            lines.append(f"{stream:<11} {kind:<18} {_union_ns(intervals) / 1e6:8.1f} {len(intervals):7d}{tag}")
    all_compute = sorted(iv for ivs in per_stream[compute].values() for iv in ivs)
    busy = _union_ns(all_compute)
    span = all_compute[-1][1] - all_compute[0][0]
    gaps = []
    end = all_compute[0][1]
    for start, stop in all_compute[1:]:
        if start > end:
            gaps.append((start - end, end))
        end = max(end, stop)
    gaps.sort(reverse=True)
    idle = sum(g for g, _ in gaps)
    lines.append(f"compute stream {compute}: busy {busy / 1e6:.1f} ms of a {span / 1e6:.1f} ms span, idle "
                 f"{idle / 1e6:.1f} ms in {len(gaps)} gaps ({sum(1 for g, _ in gaps if g > 100_000)} over 0.1 ms, "
                 f"{sum(g for g, _ in gaps if g > 100_000) / 1e6:.1f} ms in them)")
    for gap, at in gaps[:10]:
        lines.append(f"  gap {gap / 1e6:7.2f} ms at +{(at - window_start) / 1e6:9.1f} ms")
    calls, call_ns = collections.Counter(), collections.Counter()
    for e in runtime:
        calls[e.name] += 1
        call_ns[e.name] += e.duration()
    syncs = [name for name in calls if name in HOST_SYNCS]
    lines.append("host synchronisations: " + (", ".join(
        f"{name} x{calls[name]} ({call_ns[name] / 1e6:.1f} ms)" for name in syncs) or "none"))
    allocs = [name for name in calls if name in ALLOCATOR_CALLS]
    lines.append("allocator calls: " + (", ".join(
        f"{name} x{calls[name]} ({call_ns[name] / 1e6:.1f} ms)" for name in allocs) or "none"))
    lines.append("top runtime calls by host time: " + ", ".join(
        f"{name} x{calls[name]} {ns / 1e6:.1f} ms" for name, ns in call_ns.most_common(8)))
    scalar_reads = sum(1 for e in events if e.name in ("aten::_local_scalar_dense", "aten::item"))
    lines.append(f"aten::item / _local_scalar_dense calls (each a host sync): {scalar_reads}")
    kernels = collections.Counter()
    kernel_count = collections.Counter()
    for e in gpu:
        kernels[e.name[:90]] += e.duration()
        kernel_count[e.name[:90]] += 1
    lines.append(f"top {top} kernels by GPU time:")
    for name, ns in kernels.most_common(top):
        lines.append(f"  {ns / 1e6:8.1f} ms {kernel_count[name]:6d}x  {name}")
    if not with_ops:  # key_averages costs seconds per profile: only where asked
        return "\n".join(lines)
    try:
        lines.append(prof.key_averages().table(sort_by="device_time_total", row_limit=top, max_name_column_width=60))
    except Exception as err:  # noqa: BLE001 - the summary above stands without it
        lines.append(f"(key_averages failed: {type(err).__name__}: {err})")
    return "\n".join(lines)


def _frames(frames: Iterable[dict], depth: int) -> str:
    useful = [f for f in frames if not f.get("filename", "").startswith("??")]
    picked = [f for f in useful if "/torch/" not in f.get("filename", "") or "checkpoint" in f.get("filename", "")]
    picked = (picked or useful)[:depth]
    return " <- ".join(f"{f.get('filename', '?').split('site-packages/')[-1]}:{f.get('line', '?')}"
                       f"({f.get('name', '?')})" for f in picked)


def snapshot_summary(snapshot: dict, baseline_bytes: int, label: str, top: int = 30, depth: int = 4) -> str:
    """The peak of allocated bytes over the recorded trace and what was live at it (see module doc)."""
    traces = [t for t in snapshot.get("device_traces", []) if t]
    lines = [f"== memory snapshot: {label} =="]
    if not traces:
        return "\n".join(lines + ["no trace recorded"])
    trace = max(traces, key=len)
    live: dict[int, dict] = {}
    allocated = baseline_bytes
    peak, peak_index = allocated, -1
    for index, event in enumerate(trace):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            allocated += event["size"]
            if allocated > peak:
                peak, peak_index = allocated, index
        elif action == "free_completed" and event["addr"] in live:
            allocated -= live.pop(event["addr"])["size"]
    live = {}
    for event in trace[:peak_index + 1]:
        if event.get("action") == "alloc":
            live[event["addr"]] = event
        elif event.get("action") == "free_completed":
            live.pop(event["addr"], None)
    traced = sum(e["size"] for e in live.values())
    lines.append(f"trace events {len(trace)}; allocated when recording began {baseline_bytes / GIB:.2f} GiB; peak "
                 f"{peak / GIB:.2f} GiB at event {peak_index}; live at the peak from the trace {traced / GIB:.2f} "
                 f"GiB in {len(live)} blocks")
    if peak_index >= 0:
        at_peak = trace[peak_index]
        lines.append(f"the allocation that made the peak: {at_peak['size'] / MIB:.1f} MiB at "
                     f"{_frames(at_peak.get('frames', []), 8)}")
    lines.append(f"top {top} live allocations at the peak:")
    for event in sorted(live.values(), key=lambda e: -e["size"])[:top]:
        lines.append(f"  {event['size'] / MIB:9.1f} MiB  {_frames(event.get('frames', []), depth)}")
    grouped: dict[str, list[int]] = collections.defaultdict(list)
    for event in live.values():
        grouped[_frames(event.get("frames", []), 2)].append(event["size"])
    lines.append("live at the peak grouped by the two innermost useful frames:")
    for where, sizes in sorted(grouped.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(sizes) / GIB:7.2f} GiB {len(sizes):5d} blocks  {where}")
    return "\n".join(lines)
