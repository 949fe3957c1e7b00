"""``linkbreaker bench [--quick] [--device cpu|cuda] --json PATH``: online latency of the guard, runnable
without pytest.

Rows (``ms_per_batch``, median of timed calls after a warm-up; CUDA calls synchronised):

* ``plain``: the bare model; ``guarded``: the serving module (:class:`~linkbreaker_ext.serving.
  GuardedModule`) of a guard whose heads keep different hidden neurons (N rows per input, the
  worst case); ``guarded-shared``: the same guard with every head keeping head 0's hidden neurons
  (one row per input; the late layer still per head), as MNIST's fitted guards and many CIFAR-10
  ones are (others have 2-4 distinct rows: :func:`~linkbreaker_ext.layers.head_rows`); ``guard-call``:
  ``LinkBreaker.__call__`` (the Python object path);
  ``guarded-late-only``: the serving module of a guard fitted with ``use_early=False`` (only the
  late layer masked: one model forward plus the fused op, per input and per stability neighbour);
  ``*-no-stability``: the same module with the neighbour stability test off (one forward per input
  instead of two: what the test costs);
* ``plain-graph``, ``guarded-graph``, ``op-graph`` (CUDA only): the same calls captured as one CUDA
  graph each (:meth:`~linkbreaker_ext.serving.GuardedModule.cuda_graph` for the guard): the
  small-batch serving path, without per-kernel launch cost;
* ``strip-n100``: STRIP (``baselines.make_defense("strip")``, 100 overlays) scoring the batch;
* ``op`` / ``reference``: ``torch.ops.linkbreaker.guard_head`` against its plain-PyTorch reference
  (``guard_head_reference``), ``B`` inputs, ``N = C = 43`` heads, ``D = 512``, 3-D features
  ``[B, N, D]`` (what the guard passes) and 2-D ``[B, D]`` (``op-2d``, ``reference-2d``);
  ``gemm-floor``: one contiguous ``[B*N, D] x [D, C]`` GEMM, the op's FLOPs with nothing else.

Models: the MNIST net, the CIFAR-10 net and (full run only, to keep ``--quick`` under a minute)
GTSRB's ResNet20 (``models.build_model``), untrained, with guards fitted on random data (latency
does not depend on the weights; N = 10 heads, 43 for GTSRB: the method's cost at many classes).
Ratios are ``time(A) / time(B)`` for a key ``A_vs_B`` (``op_vs_reference_b256_n43`` < 1 means the op
is faster; its inverse is ``reference_over_op_b256_n43``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

SEED = 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, x, device, reps: int, warmup: int, budget_s: float) -> tuple[float, int]:
    """Median wall time of ``fn(x)`` in ms over at most ``reps`` calls (at least one), stopping once
    ``budget_s`` is spent."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        _sync(device)
        times, start = [], time.perf_counter()
        while len(times) < max(1, reps):
            t = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t)
            if time.perf_counter() - start > budget_s:
                break
    return statistics.median(times) * 1e3, len(times)


def _graphed(fn, x):
    """``fn`` captured as a CUDA graph on a static copy of ``x`` (the bench's ``*-graph`` rows for
    the bare model and the op; the guard uses its own :meth:`GuardedModule.cuda_graph`)."""
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn(static)

    def replay(t):
        static.copy_(t)
        graph.replay()
        return out
    return replay


def profile_table(fn, x, device, rows: int = 25) -> str:
    """``torch.profiler``'s table of one call of ``fn(x)`` after a warm-up, sorted by device time on
    CUDA (by CPU time otherwise): where a guarded call's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        _sync(device)
        with profile(activities=activities) as p:
            fn(x)
            _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return p.key_averages().table(sort_by=key, row_limit=rows)


def peak_bytes(fn, x) -> int:
    """Peak of live CPU memory allocated during ``fn(x)`` (no grad), from the profiler's allocation
    trace (each op's own allocations minus frees, in time order); the input itself not counted."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn(x)
    live = peak = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in p.events()):
        live += delta
        peak = max(peak, live)
    return int(peak)


def _random_data(shape, n_per_class: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_per_class * num_classes, *shape, generator=g)
    y = torch.arange(len(x)) % num_classes
    return x, y


# model key -> (builder args: data set and classes, input shape, validation samples per class,
# guard fit overrides)
MODELS = {
    "mnist": (("mnist", 10), (1, 28, 28), 30, {}),
    "cifar10": (("cifar10", 10), (3, 32, 32), 6, {"search_per_class": 3}),
    "gtsrb": (("gtsrb", 43), (3, 32, 32), 3, {"search_per_class": 2}),
}


def _fit_guard(model, x, y, num_classes=10, **overrides):
    from .guard import LinkBreaker
    opts = dict(progress=False, neighbours=0, fractions=(0.5, 1.0), min_per_class=2)
    opts.update(overrides)
    return LinkBreaker.fit(model, x, y, num_classes, **opts)


def _shared_hidden(guard):
    """``guard`` with every head keeping head 0's hidden neurons (its late masks unchanged), its
    tests included: the rank test's references in head 0's view, the only one left."""
    from .guard import LinkBreaker
    masks = {k: (v[:1].expand_as(v).clone() if k in guard.layers else v) for k, v in guard.masks.items()}
    near = guard.neighbourhood
    if near is not None:
        view = int(guard._hidden_masks()[1][1][0])  # head 0's view among the references
        near = dict(near, references=near["references"][view:view + 1])
    return LinkBreaker(guard.model, guard.layers, guard.late_layer, masks, guard.fills, guard.thresholds,
                       guard.profile, guard.config, guard.input_shape, input_range=guard.input_range,
                       stability=guard.stability, neighbourhood=near)


def _without_stability(guard):
    """``guard`` with the neighbour stability test off (one forward of the input, not two)."""
    import copy
    import dataclasses
    g = copy.copy(guard)
    g.config = dataclasses.replace(guard.config, stability_noise=0.0, stability_jitter=0.0)
    return g


def _settings(args):
    if args.smoke:  # the test suite's setting: every row kind once, tiny batches, no timing value
        return {"models": ["mnist"], "batches": {"mnist": (1, 256)}, "reps": 1, "warmup": 0,
                "budget_s": 0.0, "strip_overlays": 10, "strip_batches": (256,), "op_batch": 256,
                "memory_batches": (64,)}
    if args.quick:
        return {"models": ["mnist", "cifar10"], "batches": {"mnist": (1, 256), "cifar10": (1, 16)},
                "reps": 5, "warmup": 1, "budget_s": 1.0, "strip_overlays": 100,
                "strip_batches": (256,), "op_batch": 256, "memory_batches": (1, 256, 2048)}
    return {"models": ["mnist", "cifar10", "gtsrb"], "batches": {"mnist": (1, 64, 256, 1024),
                                                                 "cifar10": (1, 64, 256),
                                                                 "gtsrb": (1, 64)},
            "reps": 20, "warmup": 2, "budget_s": 5.0, "strip_overlays": 100,
            "strip_batches": (256,), "op_batch": 256, "memory_batches": (1, 256, 2048, 8192)}


def run(args) -> dict:
    from . import models as zoo
    from .baselines import make_defense
    from .ops import guard_head_reference
    from .serving import GuardedModule

    device = torch.device(args.device)
    s = _settings(args)
    rows = []

    def add(name, model, batch, fn, x, reps=None, warmup=None):
        ms, n = _time(fn, x, device, s["reps"] if reps is None else reps,
                      s["warmup"] if warmup is None else warmup, s["budget_s"])
        rows.append({"name": name, "model": model, "batch": int(batch), "ms_per_batch": round(ms, 4),
                     "reps": n})
        if not args.silent:
            print(f"{model:>10} {name:<18} batch {batch:>5}: {ms:10.3f} ms", file=sys.stderr)

    # the fused op against its reference: B inputs, N = C = 43 heads, D = 512
    g = torch.Generator().manual_seed(SEED)
    B, N, D = s["op_batch"], 43, 512
    w = (torch.randn(N, D, generator=g) / D ** 0.5).to(device)
    bias, masks = torch.randn(N, generator=g).to(device), torch.rand(N, D, generator=g).to(device)
    noise, th = torch.randn(D, generator=g).to(device), torch.full((N,), 0.5, device=device)
    op = torch.ops.linkbreaker.guard_head
    for suffix, f in (("", torch.randn(B, N, D, generator=g)), ("-2d", torch.randn(B, D, generator=g))):
        f = f.to(device)
        add("op" + suffix, "guard_head", B, lambda t: op(t, w, bias, masks, noise, th), f)
        add("reference" + suffix, "guard_head", B,
            lambda t: guard_head_reference(t, w, bias, masks, noise, th), f)
    # the op's arithmetic floor: one contiguous GEMM with the same FLOPs ([B*N, D] x [D, C])
    flat = torch.randn(B * N, D, generator=g).to(device)
    add("gemm-floor", "guard_head", B, lambda t: t @ w.t(), flat)
    if device.type == "cuda":  # the op alone in a captured graph: its device time, no launch cost
        f = torch.randn(B, N, D, generator=g).to(device)
        add("op-graph", "guard_head", B, _graphed(lambda t: op(t, w, bias, masks, noise, th), f), f)
    profiles = []

    for key in s["models"]:
        build, shape, per_class, overrides = MODELS[key]
        torch.manual_seed(SEED)
        model = zoo.build_model(*build).eval().to(device)
        classes = build[1]
        x_val, y_val = _random_data(shape, per_class, classes, SEED)
        guard = _fit_guard(model, x_val, y_val, classes, **overrides)
        module = GuardedModule(guard)
        shared = GuardedModule(_shared_hidden(guard))
        shared_unstable = GuardedModule(_without_stability(_shared_hidden(guard)))
        late = late_unstable = None
        if key == "mnist":
            late_guard = _fit_guard(model, x_val, y_val, use_early=False, **overrides)
            late, late_unstable = GuardedModule(late_guard), GuardedModule(_without_stability(late_guard))
        for batch in s["batches"][key]:
            x = _random_data(shape, batch, 1, SEED + 1)[0].to(device)
            add("plain", key, batch, model, x)
            add("guarded", key, batch, module, x)
            add("guarded-shared", key, batch, shared, x)
            add("guarded-shared-no-stability", key, batch, shared_unstable, x)
            if device.type == "cuda":  # the small-batch serving path: one graph replay per call
                add("plain-graph", key, batch, _graphed(model, x), x)
                add("guarded-graph", key, batch, module.cuda_graph(batch), x)
            if args.profile and key == "mnist" and batch in (1, 256):
                profiles.append(f"## guarded MNIST net, batch {batch}, {_device_name(device)}\n\n"
                                f"```\n{profile_table(module, x, device)}\n```\n")
            add("guard-call", key, batch, guard, x)
            if late is not None:
                add("guarded-late-only", key, batch, late, x)
                add("guarded-late-only-no-stability", key, batch, late_unstable, x)
            if key == "mnist" and batch in s["strip_batches"]:
                strip = make_defense("strip", n_overlays=s["strip_overlays"]).fit(
                    model, x_val, y_val, num_classes=10)
                add(f"strip-n{s['strip_overlays']}", key, batch, strip.score, x,
                    reps=min(s["reps"], 3), warmup=0)

    memory = []
    if device.type == "cpu" and "mnist" in s["models"]:
        # peak live memory of one call against the batch: the guarded module is bounded by its row
        # chunks (batch_rows rows per forward), the guard object's path and the bare model are not
        torch.manual_seed(SEED)
        model = zoo.build_model("mnist", 10).eval()
        x_val, y_val = _random_data((1, 28, 28), 30, 10, SEED)
        guard = _fit_guard(model, x_val, y_val)
        module = GuardedModule(guard)
        for batch in s["memory_batches"]:
            x = _random_data((1, 28, 28), batch, 1, SEED + 1)[0]
            for name, fn in (("plain", model), ("guarded", module), ("guard-call", guard)):
                memory.append({"name": name, "model": "mnist", "batch": batch,
                               "peak_mib": round(peak_bytes(fn, x) / 2 ** 20, 3)})
                if not args.silent:
                    print(f"{'mnist':>10} {name:<18} batch {batch:>5}: {memory[-1]['peak_mib']:10.3f} "
                          f"MiB peak", file=sys.stderr)

    if args.profile:
        os.makedirs(os.path.dirname(os.path.abspath(args.profile)), exist_ok=True)
        with open(args.profile, "w") as f:
            f.write(f"# One guarded call, profiled (`linkbreaker bench --device {device.type} "
                    f"--profile PATH`; torch {torch.__version__})\n\n" + "\n".join(profiles))
    return {"device": _device_name(device), "rows": rows, "ratios": _ratios(rows), "memory": memory,
            "settings": {"quick": bool(args.quick), "smoke": bool(args.smoke),
                         "strip_overlays": s["strip_overlays"],
                         "loadavg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "heads": {k: MODELS[k][0][1] for k in s["models"]},
                         "op": {"B": B, "N": N, "C": N, "D": D},
                         "ratio_definition": "A_vs_B = ms(A) / ms(B), same machine, same run",
                         "date": datetime.date.today().isoformat()}}


def _device_name(device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def _ratios(rows) -> dict:
    ms = {(r["name"], r["model"], r["batch"]): r["ms_per_batch"] for r in rows}

    def ratio(a, b):
        return round(ms[a] / ms[b], 4) if a in ms and b in ms and ms[b] > 0 else None

    out = {
        "op_vs_reference_b256_n43": ratio(("op", "guard_head", 256), ("reference", "guard_head", 256)),
        "reference_over_op_b256_n43": ratio(("reference", "guard_head", 256), ("op", "guard_head", 256)),
        "op_vs_gemm_floor_b256_n43": ratio(("op", "guard_head", 256), ("gemm-floor", "guard_head", 256)),
        "op_vs_reference_2d_b256_n43": ratio(("op-2d", "guard_head", 256),
                                             ("reference-2d", "guard_head", 256)),
        "guarded_vs_plain_b1": ratio(("guarded", "mnist", 1), ("plain", "mnist", 1)),
        "guarded_vs_plain_b256": ratio(("guarded", "mnist", 256), ("plain", "mnist", 256)),
        "guarded_shared_vs_plain_b1": ratio(("guarded-shared", "mnist", 1), ("plain", "mnist", 1)),
        "guarded_shared_vs_plain_b256": ratio(("guarded-shared", "mnist", 256), ("plain", "mnist", 256)),
        "guarded_shared_no_stability_vs_plain_b256": ratio(("guarded-shared-no-stability", "mnist", 256),
                                                            ("plain", "mnist", 256)),
        "guarded_late_only_no_stability_vs_plain_b256": ratio(("guarded-late-only-no-stability", "mnist", 256),
                                                               ("plain", "mnist", 256)),
        "guarded_late_only_vs_plain_b256": ratio(("guarded-late-only", "mnist", 256),
                                                 ("plain", "mnist", 256)),
        "strip_vs_guarded_b256": ratio(next((k for k in ms if k[0].startswith("strip-n")
                                             and k[1:] == ("mnist", 256)), None),
                                       ("guarded", "mnist", 256)),
        "strip_vs_guarded_shared_b256": ratio(next((k for k in ms if k[0].startswith("strip-n")
                                                    and k[1:] == ("mnist", 256)), None),
                                              ("guarded-shared", "mnist", 256)),
        "guarded_graph_vs_plain_graph_b1": ratio(("guarded-graph", "mnist", 1), ("plain-graph", "mnist", 1)),
        "guarded_graph_vs_plain_graph_b256": ratio(("guarded-graph", "mnist", 256),
                                                   ("plain-graph", "mnist", 256)),
        "guarded_graph_vs_guarded_b1": ratio(("guarded-graph", "mnist", 1), ("guarded", "mnist", 1)),
        "op_graph_vs_op_b256_n43": ratio(("op-graph", "guard_head", 256), ("op", "guard_head", 256)),
        "guard_call_vs_guarded_b256": ratio(("guard-call", "mnist", 256), ("guarded", "mnist", 256)),
    }
    for model in sorted({r["model"] for r in rows} - {"guard_head"}):
        for batch in sorted({r["batch"] for r in rows if r["model"] == model}):
            if model == "mnist" and batch in (1, 256):
                continue
            for name in ("guarded", "guarded-shared"):
                out[f"{name.replace('-', '_')}_vs_plain_{model}_b{batch}"] = ratio(
                    (name, model, batch), ("plain", model, batch))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="linkbreaker bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer batches and repeats (< 60 s on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", required=True, metavar="PATH", help="where to write the results")
    p.add_argument("--profile", metavar="PATH", default=None,
                   help="also write torch.profiler tables of one guarded MNIST call (batch 1 and 256)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny, 1 call each
    p.add_argument("--silent", action="store_true", help="no per-row progress on stderr")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("linkbreaker bench: --device cuda needs a CUDA GPU and none is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args)
    result["settings"]["wall_s"] = round(time.perf_counter() - t0, 2)
    path = os.path.abspath(args.json)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    if not args.silent:
        print(json.dumps(result["ratios"], indent=1))
        print(f"wrote {path} ({result['settings']['wall_s']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
