"""Where the time of one optimizer step goes: ``torch.profiler`` over one step, and the step's time by category.

``StepProfiler`` records one optimizer step (GPU kernels and CPU ops) into a Chrome trace, with every module call
of interest labelled (LoRA layers, frozen projections, norms, activations, rotary embeddings, attention, the vision
tower) so that the kernels they launch, in the forward pass, the recomputation and the backward pass, can be told
apart. ``analyze_trace`` splits the step's wall time into ``CATEGORIES``:

- on a GPU, the time some kernel (or copy) runs, by the category of the op that launched it; kernels that overlap on
  different streams share the time they overlap, so the categories add up to the time the GPU was busy; the rest
  is ``data wait`` (the GPU idles while the training loop waits for the next batch), ``optimizer`` (it idles while
  the host runs the optimizer step: ZeRO-Offload's CPU Adam) and ``idle gaps`` (it idles for any other reason:
  Python, DeepSpeed's hooks, synchronisation);
- on a CPU, the time spent inside each op (its own time, without the ops it calls); ``idle gaps`` is then the time
  outside any op (Python, hooks).

Backward kernels are attributed to the module of the forward op that created them (the profiler records which
forward op each backward node belongs to, by its sequence number). See docs/BENCHMARKS.md for the table it makes.
"""

from __future__ import annotations

import bisect
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

STEP_SCOPE = "bench::profiled_step"
DATA_WAIT_SCOPE = "bench::data_wait"
OPTIMIZER_SCOPE = "bench::optimizer_step"
MODULE_SCOPE_PREFIX = "module::"

GEMM = "GEMM (frozen projections, LM head)"
DEQUANT = "NF4 dequantization"
LORA = "LoRA (incl. dropout)"
ATTENTION = "attention (SDPA)"
ELEMENTWISE = "norms, activations, RoPE"
VISION = "vision tower + projector (frozen)"
DEEPSPEED = "DeepSpeed copies and collectives"
OPTIMIZER = "optimizer"
OTHER = "other ops"
DATA_WAIT = "data wait"
IDLE = "idle gaps"
CATEGORIES = (GEMM, DEQUANT, LORA, ATTENTION, ELEMENTWISE, VISION, DEEPSPEED, OPTIMIZER, OTHER, DATA_WAIT, IDLE)

_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
               "aten::_scaled_mm", "bitsandbytes::gemm_4bit")  # fmt: skip
_GEMM_KERNEL_WORDS = ("gemm", "cutlass", "nvjet", "xmma", "cublas")
_ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "flash_fwd", "flash_bwd", "fmha")
# Collectives, and the autograd functions through which ZeRO-3 fetches and releases a module's weights in backward.
_DEEPSPEED_WORDS = ("record_param_comms", "c10d::", "nccl", "gloo", "all_gather", "allgather", "reduce_scatter",
                    "all_reduce", "allreduce", "prebackwardfunction", "postbackwardfunction")  # fmt: skip
_DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
_HOST_CATEGORIES = ("cpu_op", "user_annotation", *_LAUNCH_CATEGORIES)
_BACKWARD_NODE = "autograd::engine::evaluate_function: "
# Device-side communication, by what it moves: NCCL's kernels (``ncclDevKernel_AllGather_RING_LL`` ...) and the
# host<->device copies of ZeRO-Offload. A collective's kernel runs until every rank has joined it, so its time also
# holds the wait for the slowest rank.
COMMUNICATION = {
    "all-gather": ("allgather",),
    "reduce-scatter": ("reducescatter",),
    "all-reduce": ("allreduce",),
    "broadcast": ("broadcast",),
    "host to device copies": ("memcpy htod",),
    "device to host copies": ("memcpy dtoh",),
}


def module_label(name: str, module: nn.Module) -> str | None:
    """The label of a module call in the trace (None: not labelled; its ops count for the enclosing module)."""
    class_name = type(module).__name__
    if name in ("vision_model", "mlp1"):
        return "vision"
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):  # a peft LoRA layer (its adds and copies)
        return "lora"
    if name.endswith(".base_layer"):  # the frozen projection inside a LoRA layer
        return "projection"
    if class_name.endswith("RMSNorm") or isinstance(module, nn.LayerNorm):
        return "norm"
    if name.endswith(".act_fn"):
        return "activation"
    if class_name.endswith("RotaryEmbedding"):
        return "rope"
    if name.endswith(".self_attn"):
        return "attention"
    return None


def label_modules(model: nn.Module) -> list:
    """Label the calls of the modules ``module_label`` names with profiler scopes; returns the hook handles."""
    from torch.autograd.profiler import record_function

    def enter(module, args):
        scope = record_function(module._profile_label)
        scope.__enter__()
        module._profile_scopes.append(scope)

    def leave(module, args, output):
        module._profile_scopes.pop().__exit__(None, None, None)

    handles = []
    for name, module in model.named_modules():
        label = module_label(name, module)
        if label is None:
            continue
        module._profile_label = MODULE_SCOPE_PREFIX + label
        module._profile_scopes = []
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    return handles


def _traits(name: str) -> frozenset[str]:
    """What an op's own name says about the work done inside it."""
    lowered = name.lower()
    traits = set()
    if name == DATA_WAIT_SCOPE:
        traits.add(DATA_WAIT)
    if name == OPTIMIZER_SCOPE or name.startswith("Optimizer.step"):
        traits.add(OPTIMIZER)
    if any(word in lowered for word in _DEEPSPEED_WORDS):
        traits.add(DEEPSPEED)
    if "dequantize" in lowered:
        traits.add(DEQUANT)
    if any(word in lowered for word in _ATTENTION_WORDS):
        traits.add(ATTENTION)
    if name in _MATMUL_OPS:
        traits.add(GEMM)
    return frozenset(traits)


def _classify(traits: frozenset[str], labels: tuple[str, ...], kernel: str | None = None) -> str:
    """The category of work done inside ops with ``traits`` (their own and their enclosing ops'), in labelled
    modules ``labels`` (innermost first), possibly by a device kernel (or copy) named ``kernel``."""
    if kernel is not None:
        traits = traits | _traits(kernel)
        if kernel.lower().startswith(("memcpy htod", "memcpy dtoh")):
            traits = traits | {DEEPSPEED}
    for category in (DATA_WAIT, OPTIMIZER, DEEPSPEED):
        if category in traits:
            return category
    if "vision" in labels:
        return VISION
    for category in (DEQUANT, ATTENTION):
        if category in traits:
            return category
    innermost = labels[0] if labels else None
    if innermost == "lora":
        return LORA
    if innermost == "projection" or GEMM in traits:
        return GEMM
    if kernel is not None and any(word in kernel.lower() for word in _GEMM_KERNEL_WORDS):
        return GEMM
    if innermost in ("norm", "activation", "rope", "attention"):  # the attention module's own ops: RoPE, head copies
        return ELEMENTWISE
    return OTHER


class _HostOps:
    """The host-side events of a trace (ops, annotations, kernel launches): their nesting per thread, and for each
    the traits of its enclosing ops and the labels of its enclosing modules (inside a backward node: those of the
    forward op the node belongs to, which the profiler names by its sequence number)."""

    def __init__(self, events: list[dict]):
        self.events = events
        count = len(events)
        self.parent: list[int | None] = [None] * count
        self.children_time = [0.0] * count
        order = sorted(range(count), key=lambda i: (events[i]["ts"], -events[i].get("dur", 0)))
        stacks: dict[tuple, list[int]] = defaultdict(list)
        for index in order:  # parents come before their children
            event = events[index]
            stack = stacks[(event.get("pid"), event.get("tid"))]
            while stack and _end(events[stack[-1]]) <= event["ts"]:
                stack.pop()
            if stack:
                self.parent[index] = stack[-1]
                self.children_time[stack[-1]] += event.get("dur", 0)
            stack.append(index)
        # Forward ops by autograd sequence number, in time order.
        forward_by_sequence: dict[int, list[tuple[float, int]]] = defaultdict(list)
        self.traits: list[frozenset[str]] = [frozenset()] * count
        self.labels: list[tuple[str, ...]] = [()] * count
        for index in order:
            event, parent = events[index], self.parent[index]
            name, args = event["name"], event.get("args") or {}
            inherited_labels = self.labels[parent] if parent is not None else ()
            self.traits[index] = _traits(name) | (self.traits[parent] if parent is not None else frozenset())
            if name.startswith(MODULE_SCOPE_PREFIX):
                self.labels[index] = (name[len(MODULE_SCOPE_PREFIX) :], *inherited_labels)
            elif name.startswith(_BACKWARD_NODE) and not inherited_labels:
                forward = _latest_before(forward_by_sequence.get(args.get("Sequence number"), []), event["ts"])
                self.labels[index] = self.labels[forward] if forward is not None else ()
            else:
                self.labels[index] = inherited_labels
            if args.get("Sequence number") is not None and not args.get("Fwd thread id"):
                forward_by_sequence[args["Sequence number"]].append((event["ts"], index))

    def category(self, index: int, kernel: str | None = None) -> str:
        return _classify(self.traits[index], self.labels[index], kernel)

    def self_time(self, index: int) -> float:
        return max(0.0, self.events[index].get("dur", 0) - self.children_time[index])


def _latest_before(candidates: list[tuple[float, int]], time: float) -> int | None:
    """The latest forward op before ``time`` (sequence counters are per thread, so it is the backward node's own in
    all but rare collisions)."""
    position = bisect.bisect_left(candidates, (time, -1)) - 1
    return candidates[position][1] if position >= 0 else None


def _end(event: dict) -> float:
    return event["ts"] + event.get("dur", 0)


def _overlap(intervals: list[tuple[float, float]], others: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two lists of disjoint, sorted intervals."""
    total, j = 0.0, 0
    for start, end in intervals:
        while j < len(others) and others[j][1] <= start:
            j += 1
        k = j
        while k < len(others) and others[k][0] < end:
            total += max(0.0, min(end, others[k][1]) - max(start, others[k][0]))
            k += 1
    return total


def _split_busy_time(spans: list[tuple[float, float, int]]) -> tuple[dict[int, float], list[tuple[float, float]]]:
    """Each span's share of the busy time (overlapping spans share it equally), and the busy intervals."""
    boundaries = sorted([(start, 1, i) for start, _, i in spans] + [(end, -1, i) for _, end, i in spans])
    shares: dict[int, float] = defaultdict(float)
    busy: list[tuple[float, float]] = []
    active: set[int] = set()
    previous = None
    for time, kind, i in boundaries:
        if active and previous is not None and time > previous:
            for j in active:
                shares[j] += (time - previous) / len(active)
            if busy and busy[-1][1] >= previous:
                busy[-1] = (busy[-1][0], time)
            else:
                busy.append((previous, time))
        previous = time
        if kind == 1:
            active.add(i)
        else:
            active.discard(i)
    return shares, busy


def analyze_trace(trace: dict, top: int = 15) -> dict:
    """The profiled step's wall time by category, the ops (CPU) or kernels (GPU) that took the most time, and on a
    GPU the time of each kind of communication (``communication_time``).

    ``trace`` is a Chrome trace of ``torch.profiler`` holding one ``STEP_SCOPE`` annotation. Seconds and shares (of
    the step's wall time) per category; the shares add up to 1.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    host_events = [e for e in events if e.get("cat") in _HOST_CATEGORIES]
    steps = [i for i, e in enumerate(host_events) if e["name"] == STEP_SCOPE]
    if len(steps) != 1:
        raise ValueError(f"the trace holds {len(steps)} '{STEP_SCOPE}' annotations; expected exactly one")
    step_index = steps[0]
    step = host_events[step_index]
    window_start, window_end = step["ts"], _end(step)
    wall = window_end - window_start
    host = _HostOps(host_events)
    device_events = [e for e in events if e.get("cat") in _DEVICE_CATEGORIES]
    seconds: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0, Counter()])  # seconds, calls, categories

    def add(name: str, category: str, microseconds: float) -> None:
        seconds[category] += microseconds / 1e6
        entry = by_name[name]
        entry[0] += microseconds / 1e6
        entry[1] += 1
        entry[2][category] += microseconds

    def scope_intervals(name: str) -> list[tuple[float, float]]:
        return _merge(
            [(max(e["ts"], window_start), min(_end(e), window_end)) for e in host_events if e["name"] == name]
        )

    if device_events:
        device = "cuda"
        launches = {
            (e.get("args") or {}).get("correlation"): i
            for i, e in enumerate(host.events)
            if e.get("cat") in _LAUNCH_CATEGORIES
        }
        spans = []
        for i, event in enumerate(device_events):
            start, end = max(event["ts"], window_start), min(_end(event), window_end)
            if end > start:
                spans.append((start, end, i))
        shares, busy = _split_busy_time(spans)
        for i, share in shares.items():
            event = device_events[i]
            launch = launches.get((event.get("args") or {}).get("correlation"))
            if launch is not None:
                category = host.category(launch, kernel=event["name"])
            else:
                category = _classify(frozenset(), (), kernel=event["name"])
            add(event["name"], category, share)
        idle = wall - sum(end - start for start, end in busy)
        idle_intervals, cursor = [], window_start
        for start, end in busy:
            if start > cursor:
                idle_intervals.append((cursor, start))
            cursor = max(cursor, end)
        if cursor < window_end:
            idle_intervals.append((cursor, window_end))
        # The GPU idles while the host waits for data, or runs the optimizer itself (ZeRO-Offload's CPU Adam).
        waited = _overlap(idle_intervals, scope_intervals(DATA_WAIT_SCOPE))
        host_optimizer = _overlap(idle_intervals, scope_intervals(OPTIMIZER_SCOPE))
        seconds[DATA_WAIT] += waited / 1e6
        seconds[OPTIMIZER] += host_optimizer / 1e6
        seconds[IDLE] += (idle - waited - host_optimizer) / 1e6
        communication = communication_time(device_events, spans)
    else:
        device, communication = "cpu", {}
        inside = 0.0
        for i, event in enumerate(host.events):
            same_thread = (event.get("pid"), event.get("tid")) == (step.get("pid"), step.get("tid"))
            if not same_thread or i == step_index or event["ts"] < window_start or _end(event) > window_end:
                continue
            own = host.self_time(i)
            add(event["name"], host.category(i), own)
            inside += own
        seconds[IDLE] += (wall - inside) / 1e6
    top_entries = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "device": device,
        "step_time_s": wall / 1e6,
        "categories": {
            name: {"seconds": value, "share": value / (wall / 1e6) if wall > 0 else 0.0}
            for name, value in seconds.items()
        },
        "top": [
            {"name": name, "category": categories.most_common(1)[0][0], "seconds": total, "calls": calls}
            for name, (total, calls, categories) in top_entries
        ],
        "communication": communication,
    }


def _communication_kind(name: str) -> str | None:
    squeezed = name.lower().replace("_", "")
    for kind, words in COMMUNICATION.items():
        if any(word in squeezed for word in words):
            return kind
    return None


def communication_time(device_events: list[dict], spans: list[tuple[float, float, int]]) -> dict:
    """Per kind of communication (``COMMUNICATION``) in the step: calls, the time its kernels or copies ran, and
    the part of it when no other kernel ran (exposed: the GPU did nothing but communicate)."""
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    compute = []
    for start, end, i in spans:
        kind = _communication_kind(device_events[i]["name"])
        (by_kind[kind] if kind else compute).append((start, end))
    compute = _merge(compute)
    result = {}
    for kind in COMMUNICATION:
        if kind not in by_kind:
            continue
        merged = _merge(by_kind[kind])
        busy = sum(end - start for start, end in merged)
        result[kind] = {
            "calls": len(by_kind[kind]),
            "seconds": busy / 1e6,
            "exposed_seconds": (busy - _overlap(merged, compute)) / 1e6,
        }
    return result


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


class StepProfiler:
    """``torch.profiler`` over one optimizer step: ``start()`` when a step ends, ``stop()`` when the next one ends.

    While it records, the modules ``module_label`` names are labelled and the DeepSpeed engine's ``step`` (gradient
    reduction, clipping, optimizer, copying the weights back) runs inside ``OPTIMIZER_SCOPE``; both are undone by
    ``stop()``, which writes the Chrome trace (gzipped) and returns ``analyze_trace``'s summary.
    """

    def __init__(self, model: nn.Module, trace_path: str | Path, engine=None):
        self.model, self.trace_path, self.engine = model, Path(trace_path), engine
        self._handles: list = []
        self._profiler = None
        self._step_scope = None

    def start(self) -> None:
        from torch.autograd.profiler import record_function
        from torch.profiler import ProfilerActivity, profile

        self._handles = label_modules(self.model)
        if self.engine is not None and hasattr(self.engine, "step"):
            engine_step = self.engine.step

            def step_in_scope(*args, **kwargs):
                with record_function(OPTIMIZER_SCOPE):
                    return engine_step(*args, **kwargs)

            self.engine.step = step_in_scope
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profiler = profile(activities=activities, record_shapes=False, with_stack=False)
        self._profiler.start()
        self._step_scope = record_function(STEP_SCOPE)
        self._step_scope.__enter__()

    def stop(self) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._step_scope.__exit__(None, None, None)
        self._profiler.stop()
        for handle in self._handles:
            handle.remove()
        if self.engine is not None:
            self.engine.__dict__.pop("step", None)
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.trace_path.with_name(f".{self.trace_path.name}.partial.gz")  # torch gzips a ".gz" path
        self._profiler.export_chrome_trace(str(partial))
        partial.replace(self.trace_path)
        with gzip.open(self.trace_path, "rt", encoding="utf-8") as f:
            summary = analyze_trace(json.load(f))
        return {**summary, "trace": str(self.trace_path)}


def profile_markdown(profile: dict, title: str) -> str:
    """The profile summary as Markdown tables (by category, then the top ops or kernels), for docs/BENCHMARKS.md."""
    unit = "GPU kernels" if profile["device"] == "cuda" else "CPU ops (own time)"
    lines = [
        f"**{title}**: one optimizer step, {profile['step_time_s']:.3f} s, {unit}",
        "",
        "| category | s per step | share of the step |",
        "|---|---|---|",
    ]
    for name, value in profile["categories"].items():
        lines.append(f"| {name} | {value['seconds']:.3f} | {100 * value['share']:.1f}% |")
    total = sum(value["share"] for value in profile["categories"].values())
    lines += [f"| total | {profile['step_time_s']:.3f} | {100 * total:.1f}% |", ""]
    lines += ["| top op or kernel | category | calls | s per step | share |", "|---|---|---|---|---|"]
    for entry in profile["top"]:
        name = entry["name"] if len(entry["name"]) <= 80 else entry["name"][:77] + "..."
        name = name.replace("|", "\\|")
        share = entry["seconds"] / profile["step_time_s"] if profile["step_time_s"] else 0.0
        lines.append(f"| `{name}` | {entry['category']} | {entry['calls']} | {entry['seconds']:.3f} | "
                     f"{100 * share:.1f}% |")  # fmt: skip
    if profile.get("communication"):
        lines += ["", "| communication | calls | s per step (running) | s exposed (no other kernel running) |",
                  "|---|---|---|---|"]  # fmt: skip
        for kind, value in profile["communication"].items():
            lines.append(f"| {kind} | {value['calls']} | {value['seconds']:.3f} | {value['exposed_seconds']:.3f} |")
    return "\n".join(lines) + "\n"
