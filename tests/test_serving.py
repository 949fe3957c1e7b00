"""The serving module (GuardedModule): equal to guard(x), stateless, exportable (torch.export, save/load,
a fresh process), compilable, safe under concurrent calls; and the bench command's JSON."""
import concurrent.futures
import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import FAST, NUM_CLASSES
from linkbreaker_ext import LinkBreaker
from linkbreaker_ext import benchmark
from linkbreaker_ext.serving import GuardedModule

HAS_CUDA = torch.cuda.is_available()
GUARDS = ["full", "late_only", "no_consistency", "hidden_only", "peak"]


def _fit(model, synth, **kw):
    opts = dict(FAST, progress=False)
    opts.update(kw)
    return LinkBreaker.fit(model, synth["x_val"], synth["y_val"], NUM_CLASSES, **opts)


@pytest.fixture(scope="module")
def guards(deep_net, guard_deep, synth):
    """Guards on the two-conv net: three masked layers (conftest's), late layer only, no veto, one
    hidden conv layer only, and conftest's with its channel-maximum views read as their peak too."""
    return {"full": guard_deep,
            "late_only": _fit(deep_net, synth, layers=["input", "1", "3"], use_early=False),
            "no_consistency": _fit(deep_net, synth, layers=["input", "1", "3"], consistency=False),
            "hidden_only": _fit(deep_net, synth, layers=["3"]),
            "peak": guard_deep.recalibrate(synth["x_val"], synth["y_val"], consistency_peak="max")}


@pytest.fixture(scope="module")
def module(guard_deep):
    return GuardedModule(guard_deep)


def _inputs(synth):
    """Clean test images plus a few far-from-everything ones (exercise OOD and the veto)."""
    x = synth["x_test"]
    g = torch.Generator().manual_seed(5)
    return torch.cat([x, torch.rand(12, *x.shape[1:], generator=g)])


def assert_same(out, result):
    labels, verdict, conf = out
    assert labels.dtype == verdict.dtype == torch.int64 and conf.dtype == torch.float32
    assert torch.equal(labels, result.labels)
    assert torch.equal(verdict, result.verdict)
    torch.testing.assert_close(conf, result.confidences, rtol=1e-5, atol=1e-6)


def assert_identical(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("which", GUARDS)
def test_module_equals_guard(which, guards, synth):
    guard = guards[which]
    x = _inputs(synth)
    r = guard(x)
    assert_same(GuardedModule(guard)(x), r)
    # any row chunking gives the same answer
    assert_same(GuardedModule(guard, batch_rows=7)(x), r)
    assert r.verdict.unique().numel() >= 2  # not a degenerate comparison


def test_module_keeps_the_veto_and_the_ood_hint(guards, synth):
    """The consistency veto changes verdicts here, and the module follows it (not the raw op vote)."""
    guard = guards["full"]
    x = _inputs(synth)
    r = guard(x)
    raw = guard.head_confidences(x)
    assert not torch.equal(raw[2], r.verdict) or not torch.equal(raw[1], r.labels)
    assert_same(GuardedModule(guard)(x), r)


def test_empty_batch_and_input_checks(module, synth):
    labels, verdict, conf = module(synth["x_test"][:0])
    assert labels.shape == verdict.shape == (0,) and conf.shape == (0, NUM_CLASSES)
    with pytest.raises(ValueError, match="shape"):
        module(torch.zeros(2, 1, 5, 5))
    with pytest.raises(TypeError):
        module(torch.zeros(2, 1, 12, 12, dtype=torch.int64))
    bad = synth["x_test"][:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        module(bad)


def test_user_model_untouched(deep_net, guard_deep, synth):
    before = copy.deepcopy(deep_net.state_dict())
    m = GuardedModule(guard_deep)
    for _ in range(3):
        m(synth["x_test"][:9])
    for mod in deep_net.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    after = deep_net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the module owns its weights: nothing aliases the user's tensors
    user = {t.data_ptr() for t in deep_net.state_dict().values()}
    assert not user & {t.data_ptr() for t in m.state_dict().values()}
    assert not any(p.requires_grad for p in m.parameters())


def test_export_save_load_round_trip(module, guard_deep, synth, tmp_path):
    x = _inputs(synth)
    expected = module(x)
    assert_same(expected, guard_deep(x))
    ep = torch.export.export(module, (x,))
    assert_identical(ep.module()(x), expected)
    path = tmp_path / "guarded.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    assert_identical(loaded.module()(x), expected)
    ops = {str(n.target) for n in loaded.graph.nodes if n.op == "call_function"}
    assert "linkbreaker.guard_head.default" in ops


@pytest.mark.parametrize("setting, value, buffers", [
    ("stability_contrast", 0.5, ("stability_contrast",)),
    ("stability_jitter", 0.5, ("stability_jitter",)),
    ("stability_median", 3, ("stability_median_bound", "stability_median_gate"))])
def test_a_guard_with_shaped_neighbours_exports(guard_deep, synth, setting, value, buffers):
    """``stability_contrast`` > 0 (a reference contrast), ``stability_jitter`` > 0 (displacement
    grids, the resampling part of the graph) or ``stability_median`` (the filtered neighbour, its
    bound and its own gate): what shapes or judges the neighbours travels as buffers of the exported
    program, whose answers are the guard's."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], **{setting: value})
    x = _inputs(synth)
    expected = g.as_module()(x)
    assert_same(expected, g(x))
    ep = torch.export.export(g.as_module(), (x,))
    assert set(buffers) <= set(dict(ep.named_buffers()))
    assert_identical(ep.module()(x), expected)


def test_a_guard_with_the_rank_test_exports(guard_deep, synth):
    """The neighbourhood rank test's references, labels, bound and gate travel as buffers of the
    exported program, whose answers are the guard's (references with shifted labels, so that the
    test raises alarms on these well-separated synthetic classes)."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], neighbourhood_quantile=0.5)
    g.neighbourhood["labels"] = (g.neighbourhood["labels"] + 1) % int(g.num_heads)
    x = _inputs(synth)
    expected = g.as_module()(x)
    assert_same(expected, g(x))
    assert (g(x).verdict != guard_deep(x).verdict).any(), "the rank test changed nothing: degenerate"
    ep = torch.export.export(g.as_module(), (x,))
    assert {"rank_references", "rank_labels", "rank_bound", "rank_gate"} <= set(dict(ep.named_buffers()))
    assert_identical(ep.module()(x), expected)


def test_exported_program_runs_in_a_fresh_process(module, synth, tmp_path):
    x = _inputs(synth)
    expected = module(x)
    torch.export.save(torch.export.export(module, (x,)), tmp_path / "guarded.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent("""
        import sys, torch
        import linkbreaker_ext  # registers linkbreaker::guard_head
        io = torch.load(sys.argv[2])
        out = torch.export.load(sys.argv[1]).module()(io["x"])
        same = all(torch.equal(a, b) for a, b in zip(out, io["expected"], strict=True))
        print("IDENTICAL" if same else "DIFFERENT")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "guarded.pt2"),
                           str(tmp_path / "io.pt")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "IDENTICAL"


def test_torch_compile(module, synth):
    """Traced in one graph (no graph break); aot_eager keeps the test fast (inductor gives the same
    outputs; it is slow to compile on 2 CPU cores)."""
    torch._dynamo.reset()
    x = _inputs(synth)[:40]
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    expected = module(x)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    torch.testing.assert_close(out[2], expected[2])


def test_concurrent_guarded_and_plain_calls(deep_net, module, synth):
    """1,000 calls from 8 threads, guarded module and the user's model interleaved: every output is
    the one a lone call gives, and nothing fails."""
    x = synth["x_test"]
    batches = [x[i % 50:i % 50 + 1 + i % 7] for i in range(1000)]
    with torch.no_grad():
        expect = [module(b) if i % 2 == 0 else deep_net(b) for i, b in enumerate(batches)]

    def call(i):
        with torch.no_grad():
            return module(batches[i]) if i % 2 == 0 else deep_net(batches[i])

    errors = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(1000)]
        for i, f in enumerate(futures):
            try:
                out = f.result()
            except Exception:  # noqa: BLE001 - counted, the assertion says how many
                errors += 1
                continue
            if i % 2 == 0:
                assert_identical(out, expect[i])
            else:
                assert torch.equal(out, expect[i])
    assert errors == 0


def test_peak_memory_is_bounded_by_the_chunk(guard_deep):
    """A call's peak of live CPU memory (profiler allocation trace) does not grow with the batch
    beyond the outputs: the rows run in chunks of ``batch_rows``."""
    # 32 rows per input and forward, whatever the stability neighbours per input (1 + draws)
    m = GuardedModule(guard_deep, batch_rows=32 * (1 + guard_deep.config.stability_draws))
    small = benchmark.peak_bytes(m, torch.rand(100, *guard_deep.input_shape))
    large = benchmark.peak_bytes(m, torch.rand(2000, *guard_deep.input_shape))
    outputs = 2000 * (8 + 8 + 4 * NUM_CLASSES)  # labels, verdict, confidences
    assert 0 < large <= small + 2 * outputs


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_module_on_cuda(guard_deep, synth):
    m = GuardedModule(guard_deep).cuda()
    x = _inputs(synth)
    out = m(x.cuda())
    ref = GuardedModule(guard_deep)(x)
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])
    torch.testing.assert_close(out[2].cpu(), ref[2], rtol=1e-4, atol=1e-5)


def test_cuda_graph_refuses_a_module_that_is_not_on_a_gpu(guard_deep):
    with pytest.raises(ValueError, match="CUDA device"):
        GuardedModule(guard_deep).cuda_graph(4)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("batch", [1, 7])
def test_cuda_graph_replays_the_eager_module(guard_deep, synth, batch):
    m = GuardedModule(guard_deep).cuda()
    graphed = m.cuda_graph(batch)
    x = _inputs(synth)
    first, second = x[:batch].cuda(), x[batch:2 * batch].cuda()
    out1 = graphed(first)
    out2 = graphed(second)  # a later replay must not overwrite what the first call returned
    for out, xs in ((out1, first), (out2, second)):
        ref = m(xs)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="captured for inputs of shape"):
        graphed(x[:batch + 1].cuda())
    with pytest.raises(ValueError, match="graph runs on"):
        graphed(x[:batch])


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU path")
def test_bench_cuda_without_gpu_exits_cleanly(tmp_path):
    assert benchmark.main(["--device", "cuda", "--json", str(tmp_path / "b.json"), "--silent"]) == 2
    assert not (tmp_path / "b.json").exists()


def test_bench_writes_the_json_schema(tmp_path):
    path = tmp_path / "out" / "bench.json"
    profile = tmp_path / "out" / "profile.md"
    assert benchmark.main(["--quick", "--smoke", "--silent", "--device", "cpu", "--json", str(path),
                           "--profile", str(profile)]) == 0
    result = json.loads(path.read_text())
    text = profile.read_text()  # one profiler table per profiled batch, naming the fused op
    assert text.count("## guarded MNIST net, batch") == 2 and "linkbreaker::guard_head" in text
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert result["rows"]
    for row in result["rows"]:
        assert {"name", "model", "batch", "ms_per_batch"} <= row.keys()
        assert isinstance(row["batch"], int) and row["ms_per_batch"] > 0
    names = {(r["name"], r["model"]) for r in result["rows"]}
    assert {("plain", "mnist"), ("guarded", "mnist"), ("guarded-shared", "mnist"), ("guarded-late-only", "mnist"),
            ("guarded-shared-no-stability", "mnist"), ("guarded-late-only-no-stability", "mnist"),
            ("op", "guard_head"), ("reference", "guard_head")} <= names
    for key in ("op_vs_reference_b256_n43", "guarded_vs_plain_b1", "guarded_vs_plain_b256",
                "guarded_late_only_vs_plain_b256", "strip_vs_guarded_b256",
                "guarded_shared_vs_plain_b256", "strip_vs_guarded_shared_b256",
                "guarded_shared_no_stability_vs_plain_b256", "guarded_late_only_no_stability_vs_plain_b256"):
        assert isinstance(result["ratios"][key], float) and result["ratios"][key] > 0, key


def test_bench_shared_guard_keeps_the_rank_test_in_head_0s_view(guard_deep, synth):
    assert guard_deep.neighbourhood is not None
    shared = benchmark._shared_hidden(guard_deep)
    assert shared.neighbourhood is not None and shared.neighbourhood["references"].shape[0] == 1
    x = synth["x_test"][:50]
    ours, theirs = shared(x), guard_deep(x)
    # head 0 keeps its own masks, so its view, references and rank ratios are the guard's
    assert torch.equal(ours.neighbourhood[:, 0], theirs.neighbourhood[:, 0])
    assert torch.equal(ours.confidences[:, 0], theirs.confidences[:, 0])


def _with_masks(guard, edit):
    """The same fitted guard with its hidden masks changed by ``edit(name, masks) -> masks``."""
    masks = {k: (edit(k, v.clone()) if k in guard.layers else v) for k, v in guard.masks.items()}
    return LinkBreaker(guard.model, guard.layers, guard.late_layer, masks, guard.fills,
                       guard.thresholds, guard.profile, guard.config, guard.input_shape,
                       input_range=guard.input_range)


def _all_kept(name, m):
    return torch.ones_like(m)


def _first_two_agree(name, m):
    m[1] = m[0]  # heads 0 and 1 share a row, head 2 has its own
    m[2] = 1 - m[0]
    return m


@pytest.mark.parametrize("edit, rows", [(_all_kept, 1), (_first_two_agree, 2)])
def test_heads_with_equal_masks_share_a_forward(edit, rows, guard_deep, synth, monkeypatch):
    """Heads whose masks agree in every masked layer run as one row; the answers equal running every
    head on its own row (the unshared path, forced by patching head_rows)."""
    from linkbreaker_ext import guard as guard_mod, layers, serving
    guard = _with_masks(guard_deep, edit)
    x = _inputs(synth)
    first, row = layers.head_rows({n: guard.masks[n] for n in guard.layers})
    assert first.numel() == rows and row.numel() == NUM_CLASSES
    module = GuardedModule(guard)
    assert module.rows == rows
    shared, shared_dev = guard(x), guard.deviations(x, by_layer=True)
    assert_same(module(x), shared)
    assert_same(GuardedModule(guard, batch_rows=7)(x), shared)
    # any chunking of the guard's own path too (11 rows: forwards of 11 inputs or 3, deviations in 3s)
    small = _with_masks(guard_deep, edit)
    small.config = dataclasses.replace(small.config, batch_rows=11)
    assert_same((shared.labels, shared.verdict, shared.confidences), small(x))

    def every_head_alone(masks):
        n = next(iter(masks.values())).shape[0]
        return torch.arange(n), torch.arange(n)

    monkeypatch.setattr(guard_mod, "head_rows", every_head_alone)
    monkeypatch.setattr(serving, "head_rows", every_head_alone)
    alone = _with_masks(guard_deep, edit)  # no cached rows
    assert GuardedModule(alone).rows == NUM_CLASSES
    expect = alone(x)
    assert_same((shared.labels, shared.verdict, shared.confidences), expect)
    torch.testing.assert_close(shared_dev, alone.deviations(x, by_layer=True), rtol=1e-5, atol=1e-5)
    assert_same(GuardedModule(alone)(x), expect)
    assert expect.verdict.unique().numel() >= 2  # not a degenerate comparison


def test_shared_rows_follow_masks_edited_after_the_first_call(guard_deep, synth):
    """The guard caches its masks' rows, keyed on the tensors' versions: an in-place edit is seen."""
    guard = _with_masks(guard_deep, _all_kept)
    x = _inputs(synth)
    guard(x)
    assert guard._hidden_masks()[1][0].numel() == 1
    guard.masks[guard.layers[0]][0].zero_()
    assert guard._hidden_masks()[1][0].numel() == 2
    assert_same(GuardedModule(guard)(x), guard(x))
