"""Compiled guard-head op vs the plain-PyTorch reference (linkbreaker_ext.ops).

Tolerances: conf is compared with atol=1e-5 (fp32 features) / 1e-4 (fp16/bf16
features; inputs are the same low-precision values, only summation order differs).
verdict/labels are compared exactly, except on rows where some |conf - threshold|
is below the tolerance (or, for verdict 2, the top-2 confidences are within it),
where the float rounding of the folded GEMM may legitimately flip the decision.
"""
import math
import random

import pytest
import torch

from linkbreaker_ext.ops import backend_info, guard_head, guard_head_reference

OP = torch.ops.linkbreaker.guard_head

HAS_CUDA = torch.cuda.is_available() and backend_info()["cuda_compiled"]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="CUDA device or CUDA kernels unavailable"),
    ),
]
FEATURE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-4


def make_inputs(B, N, C, D, *, per_head, fdtype=torch.float32, device="cpu", seed=0, soft=True):
    g = torch.Generator().manual_seed(seed)
    shape = (B, N, D) if per_head else (B, D)
    features = torch.randn(shape, generator=g).to(fdtype)
    weight = torch.randn(C, D, generator=g) * (4.0 / math.sqrt(D))
    bias = torch.randn(C, generator=g) * 0.5
    if soft:
        masks = torch.rand(N, D, generator=g)
    else:
        masks = (torch.rand(N, D, generator=g) < 0.5).float()
    noise = torch.randn(D, generator=g)
    # Thresholds spread between "rarely credible" and "often credible".
    lo, hi = math.log(0.5 / C), math.log(0.9)
    thresholds = torch.exp(lo + (hi - lo) * torch.rand(N, generator=g))
    return tuple(t.to(device) for t in (features, weight, bias, masks, noise, thresholds))


def assert_matches_reference(out, ref, thresholds, tol):
    conf, labels, verdict = out
    rconf, rlabels, rverdict = ref
    B, N = rconf.shape
    assert conf.shape == (B, N) and conf.dtype == torch.float32
    assert labels.shape == (B,) and labels.dtype == torch.int64
    assert verdict.shape == (B,) and verdict.dtype == torch.int64
    assert conf.device == rconf.device
    torch.testing.assert_close(conf, rconf, atol=tol, rtol=0, equal_nan=True)
    if B == 0:
        return
    near_thr = ((rconf - thresholds.float()).abs() < tol).any(dim=1)
    top2 = rconf.topk(min(2, N), dim=1).values
    near_tie = (top2[:, 0] - top2[:, -1]).abs() < tol if N > 1 else torch.zeros_like(near_thr)
    ambiguous = near_thr | ((rverdict == 2) & near_tie)
    ok = ~ambiguous
    assert ok.float().mean() > 0.9, "too many ambiguous rows: test inputs are degenerate"
    assert torch.equal(verdict[ok], rverdict[ok])
    assert torch.equal(labels[ok], rlabels[ok])
    # Internal consistency on every row.
    credible = conf >= thresholds.float()
    count = credible.sum(1)
    assert torch.equal(verdict, torch.where(count == 1, 0, torch.where(count >= 2, 1, 2)))
    assert torch.all(labels[verdict == 1] == -1)
    acc = verdict == 0
    assert torch.all(credible[acc, labels[acc]])


def _sample_cases(n_cases=48, seed=20240601, budget=3_000_000):
    rng = random.Random(seed)
    cases = []
    for i in range(n_cases):
        B = rng.choice([0, 1, 1, 2, 3] + [rng.randint(1, 512) for _ in range(6)])
        N = rng.randint(2, 43)
        C = N if rng.random() < 0.4 else N + rng.randint(1, 40)
        D = max(1, int(round(math.exp(rng.uniform(0.0, math.log(4096))))))
        per_head = rng.random() < 0.5
        fdtype = rng.choice(FEATURE_DTYPES)
        # keep the reference's [B, N, D] materialisation cheap
        while B > 1 and B * N * max(D, C) > budget:
            B //= 2
        cases.append(pytest.param(B, N, C, D, per_head, fdtype, i, id=f"B{B}-N{N}-C{C}-D{D}-{'BND' if per_head else 'BD'}-{str(fdtype)[6:]}"))
    # Edge shapes always present.
    cases += [
        pytest.param(0, 2, 2, 1, False, torch.float32, 100, id="empty-BD"),
        pytest.param(0, 5, 7, 16, True, torch.float32, 101, id="empty-BND"),
        pytest.param(1, 43, 43, 4096, False, torch.float32, 102, id="B1-N43-D4096"),
        pytest.param(512, 43, 43, 100, True, torch.float16, 103, id="B512-N43-BND-half"),
        pytest.param(512, 10, 10, 512, False, torch.bfloat16, 104, id="B512-N10-BD-bf16"),
        pytest.param(7, 2, 2, 1, True, torch.float32, 105, id="D1-N2-C2"),
    ]
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,N,C,D,per_head,fdtype,seed", _sample_cases())
def test_random_shapes_match_reference(device, B, N, C, D, per_head, fdtype, seed):
    args = make_inputs(B, N, C, D, per_head=per_head, fdtype=fdtype, device=device, seed=seed, soft=seed % 3 != 0)
    out = OP(*args)
    ref = guard_head_reference(*args)
    assert_matches_reference(out, ref, args[5], _tol(fdtype))
    # the checked wrapper returns the same thing
    out2 = guard_head(*args)
    for a, b in zip(out, out2):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", [torch.float64, torch.float16])
def test_other_parameter_dtypes(device, wdtype):
    f, W, b, m, n, t = make_inputs(33, 6, 9, 40, per_head=False, device=device, seed=5)
    args = (f, W.to(wdtype), b.to(wdtype), m.to(wdtype), n.to(wdtype), t.to(wdtype))
    assert_matches_reference(OP(*args), guard_head_reference(*args), t.to(wdtype), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_features(device):
    f, W, b, m, n, t = make_inputs(20, 5, 8, 30, per_head=True, device=device, seed=7)
    f_nc = f.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not f_nc.is_contiguous()
    assert_matches_reference(OP(f_nc, W, b, m, n, t), guard_head_reference(f, W, b, m, n, t), t, 1e-5)


# ---------------------------------------------------------------------------
# Exact semantics: ties at the threshold, explicit verdicts, argmax tie rule.
# ---------------------------------------------------------------------------

def _uniform_conf_inputs(B, N, C, D, per_head, fdtype, device):
    """Zero weight + equal bias: every logit equal, so every conf is exactly 1/C."""
    shape = (B, N, D) if per_head else (B, D)
    features = torch.randn(shape).to(fdtype)
    weight = torch.zeros(C, D)
    bias = torch.full((C,), 0.37)
    masks = torch.rand(N, D)
    noise = torch.randn(D)
    return [t.to(device) for t in (features, weight, bias, masks, noise)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("fdtype", FEATURE_DTYPES)
@pytest.mark.parametrize("B", [6, 20])  # B <= C and B > C take different GEMM paths
def test_credible_at_exact_threshold(device, per_head, fdtype, B):
    N, C, D = 5, 8, 12  # C power of two: 1/C is exact in float32
    f, W, b, m, n = _uniform_conf_inputs(B, N, C, D, per_head, fdtype, device)
    exact = 1.0 / C
    above = torch.nextafter(torch.tensor(exact), torch.tensor(1.0)).item()  # one float32 ulp up
    assert torch.tensor(above) > exact

    # every head exactly at its threshold -> all credible -> alarm
    thr = torch.full((N,), exact, device=device)
    conf, labels, verdict = OP(f, W, b, m, n, thr)
    assert torch.all(conf == exact)
    assert verdict.tolist() == [1] * B and labels.tolist() == [-1] * B
    ref = guard_head_reference(f, W, b, m, n, thr)
    assert torch.equal(ref[2], verdict) and torch.equal(ref[1], labels)

    # only head 3 sits exactly at its threshold -> accept, label 3
    thr = torch.full((N,), above, device=device)
    thr[3] = exact
    conf, labels, verdict = OP(f, W, b, m, n, thr)
    assert verdict.tolist() == [0] * B and labels.tolist() == [3] * B
    ref = guard_head_reference(f, W, b, m, n, thr)
    assert torch.equal(ref[2], verdict) and torch.equal(ref[1], labels)

    # all thresholds one ulp above -> none credible -> OOD, argmax tie -> smallest k = 0
    thr = torch.full((N,), above, device=device)
    conf, labels, verdict = OP(f, W, b, m, n, thr)
    assert verdict.tolist() == [2] * B and labels.tolist() == [0] * B
    ref = guard_head_reference(f, W, b, m, n, thr)
    assert torch.equal(ref[2], verdict) and torch.equal(ref[1], labels)


def _identity_model(C, device):
    D = C
    weight = 10.0 * torch.eye(C, D)
    bias = torch.zeros(C)
    masks = torch.ones(4, D)  # N = 4 heads, keep every neuron
    noise = torch.zeros(D)
    return [t.to(device) for t in (weight, bias, masks, noise)]


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_verdicts_shared_features(device):
    C = 8
    W, b, m, n = _identity_model(C, device)
    e = torch.eye(C)
    features = torch.stack(
        [
            e[2],                   # one strong class -> accept, label 2
            e[1] + e[3],            # two heads credible -> alarm
            torch.zeros(C),         # nothing credible, all conf equal -> OOD, label 0 (tie)
            0.05 * e[2],            # nothing credible, class 2 largest -> OOD, label 2
            0.05 * (e[1] + e[3]),   # OOD with exact conf tie between 1 and 3 -> label 1
            e[6],                   # class 6 has no head (N=4): OOD, argmax over heads
            e[0] + 0.5 * e[2],      # head 0 credible, head 2 not -> accept, label 0
        ]
    ).to(device)
    thr = torch.full((4,), 0.3, device=device)
    conf, labels, verdict = OP(features, W, b, m, n, thr)
    assert verdict.tolist() == [0, 1, 2, 2, 2, 2, 0]
    assert labels.tolist() == [2, -1, 0, 2, 1, 0, 0]
    assert conf[4, 1] == conf[4, 3]
    ref = guard_head_reference(features, W, b, m, n, thr)
    assert torch.equal(ref[2], verdict) and torch.equal(ref[1], labels)
    torch.testing.assert_close(conf, ref[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_verdicts_per_head_features_and_masks(device):
    C = 8
    W, b, _, _ = _identity_model(C, device)
    N = 3
    e = torch.eye(C, device=device)
    # head k only sees neuron k; everything else is replaced by the noise vector
    masks = e[:N].clone()
    noise = torch.zeros(C, device=device)
    feats = torch.zeros(3, N, C, device=device)
    feats[0, 1] = e[1]            # only head 1 sees its neuron -> accept 1
    feats[1, 0] = e[0]
    feats[1, 2] = e[2]            # heads 0 and 2 -> alarm
    feats[2, :] = e[5]            # neuron 5 masked out for every head -> OOD
    thr = torch.full((N,), 0.5, device=device)
    conf, labels, verdict = OP(feats, W, b, masks, noise, thr)
    assert verdict.tolist() == [0, 1, 2]
    assert labels.tolist() == [1, -1, 0]
    assert torch.allclose(conf[2], torch.full((N,), 1.0 / C, device=device), atol=1e-7)
    ref = guard_head_reference(feats, W, b, masks, noise, thr)
    assert torch.equal(ref[2], verdict) and torch.equal(ref[1], labels)
    # noise fills the masked-out positions: drop neuron 2 from head 2's mask and put
    # a strong noise value there -> head 2 (and only head 2) becomes credible
    noise2 = noise.clone()
    noise2[2] = 1.0
    masks2 = masks.clone()
    masks2[2, 2] = 0.0
    conf, labels, verdict = OP(feats[2:], W, b, masks2, noise2, thr)
    assert verdict.tolist() == [0] and labels.tolist() == [2]


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_logits_flagged(device):
    # finite inputs whose logits overflow: that row must not come back as garbage
    C, D, N = 6, 6, 3
    W = torch.eye(C, D, device=device) * 1e20
    b = torch.zeros(C, device=device)
    m = torch.ones(N, D, device=device)
    n = torch.zeros(D, device=device)
    thr = torch.full((N,), 0.5, device=device)
    f = torch.zeros(2, D, device=device)
    f[0, 1] = 1e20  # z = inf
    f[1, 1] = 1e-19  # z = 10 -> head 1 credible
    conf, labels, verdict = OP(f, W, b, m, n, thr)
    assert torch.isnan(conf[0]).all() and labels[0] == -1 and verdict[0] == 2
    assert torch.isfinite(conf[1]).all() and labels[1] == 1 and verdict[1] == 0
    ref = guard_head_reference(f, W, b, m, n, thr)
    torch.testing.assert_close(conf, ref[0], equal_nan=True)
    assert torch.equal(ref[1], labels) and torch.equal(ref[2], verdict)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------

def _valid(device="cpu", per_head=False):
    return list(make_inputs(4, 3, 5, 7, per_head=per_head, device=device, seed=11))


def _set(i, value_fn):
    def mutate(args):
        args[i] = value_fn(args[i])
        return args

    return mutate


def _poke(i, idx, value):
    def mutate(args):
        args[i] = args[i].clone()
        args[i][idx] = value
        return args

    return mutate


SHAPE_DTYPE_ERRORS = [
    ("feat-1d", _set(0, lambda t: t[0]), r"features must be 2-D"),
    ("feat-4d", _set(0, lambda t: t[None, None]), r"features must be 2-D"),
    ("feat-lastdim", _set(0, lambda t: t[:, :-1]), r"features last dim"),
    ("feat-3d-N", _set(0, lambda t: t[:, None].expand(-1, 2, -1)), r"3-D features must be \[B, N, D\]"),
    ("weight-1d", _set(1, lambda t: t[0]), r"weight must be 2-D"),
    ("bias-shape", _set(2, lambda t: t[:-1]), r"bias must be 1-D \[C\]"),
    ("masks-1d", _set(3, lambda t: t[0]), r"masks must be 2-D"),
    ("masks-D", _set(3, lambda t: t[:, :-1]), r"masks must be \[N, D\]"),
    ("masks-N0", _set(3, lambda t: t[:0]), r"masks must hold at least one head"),
    ("masks-N>C", _set(3, lambda t: t[:1].expand(6, -1)), r"masks has N = 6 heads but weight has only C = 5"),
    ("noise-shape", _set(4, lambda t: t[:-1]), r"noise must be 1-D \[D\]"),
    ("thr-shape", _set(5, lambda t: t[:-1]), r"thresholds must be 1-D \[N\]"),
    ("feat-int", _set(0, lambda t: t.long()), r"features must be a floating-point tensor"),
    ("feat-bool", _set(0, lambda t: t > 0), r"features must be a floating-point tensor"),
    ("weight-int", _set(1, lambda t: t.int()), r"weight must be a floating-point tensor"),
    ("bias-int", _set(2, lambda t: t.long()), r"bias must be a floating-point tensor"),
    ("masks-bool", _set(3, lambda t: t > 0.5), r"masks must be a floating-point tensor"),
    ("noise-int", _set(4, lambda t: t.long()), r"noise must be a floating-point tensor"),
    ("thr-int", _set(5, lambda t: t.long()), r"thresholds must be a floating-point tensor"),
]

VALUE_ERRORS = [
    ("feat-nan", _poke(0, (1, 2), float("nan")), r"features contain NaN or Inf"),
    ("feat-inf", _poke(0, (0, 0), float("inf")), r"features contain NaN or Inf"),
    ("feat-ninf", _poke(0, (3, 2), float("-inf")), r"features contain NaN or Inf"),
    ("thr-nan", _poke(5, 1, float("nan")), r"thresholds contain NaN or Inf"),
    ("thr-inf", _poke(5, 0, float("inf")), r"thresholds contain NaN or Inf"),
    ("masks-neg", _poke(3, (0, 0), -0.01), r"masks must have all values in \[0, 1\]"),
    ("masks-gt1", _poke(3, (2, 6), 1.5), r"masks must have all values in \[0, 1\]"),
    ("masks-nan", _poke(3, (1, 1), float("nan")), r"masks must have all values in \[0, 1\]"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,mutate,match", SHAPE_DTYPE_ERRORS, ids=[c[0] for c in SHAPE_DTYPE_ERRORS])
def test_bad_shapes_and_dtypes(device, name, mutate, match):
    args = mutate(_valid(device))
    with pytest.raises(RuntimeError, match=match):
        OP(*args)
    with pytest.raises((RuntimeError, ValueError), match=match):
        guard_head(*args)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("name,mutate,match", VALUE_ERRORS, ids=[c[0] for c in VALUE_ERRORS])
def test_bad_values_cpu_op(per_head, name, mutate, match):
    args = mutate(_valid("cpu", per_head=per_head))
    with pytest.raises(RuntimeError, match=match):
        OP(*args)
    with pytest.raises((RuntimeError, ValueError), match=match):
        guard_head(*args)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA device or CUDA kernels unavailable")
@pytest.mark.parametrize("name,mutate,match", VALUE_ERRORS, ids=[c[0] for c in VALUE_ERRORS])
def test_bad_values_cuda_wrapper(name, mutate, match):
    args = mutate(_valid("cuda"))
    with pytest.raises((RuntimeError, ValueError), match=match):
        guard_head(*args)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA device or CUDA kernels unavailable")
def test_cuda_raw_op_nan_features_not_silent():
    args = _valid("cuda")
    args[0] = args[0].clone()
    args[0][1, 2] = float("nan")
    conf, labels, verdict = OP(*args)  # unchecked entry point: flagged rows instead
    assert torch.isnan(conf[1]).all() and labels[1].item() == -1 and verdict[1].item() == 2
    good = [0, 2, 3]
    assert torch.isfinite(conf[good]).all()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA device or CUDA kernels unavailable")
@pytest.mark.parametrize("i,name", [(0, "features"), (1, "weight"), (2, "bias"), (3, "masks"), (4, "noise"), (5, "thresholds")])
def test_mixed_devices_rejected(i, name):
    args = _valid("cuda")
    if i == 0:
        args = [a.cpu() for a in args]
        args[0] = args[0].cuda()
        name = "weight"
    else:
        args[i] = args[i].cpu()
    with pytest.raises(RuntimeError, match=rf"same device.*{name} is on"):
        OP(*args)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA device or CUDA kernels unavailable")
def test_cuda_matches_cpu():
    args = make_inputs(300, 43, 43, 512, per_head=False, seed=3)
    cpu = OP(*args)
    gpu = OP(*[a.cuda() for a in args])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Autograd / torch.compile / opcheck / backend info
# ---------------------------------------------------------------------------

def test_outputs_not_differentiable():
    f, W, b, m, n, t = _valid()
    W.requires_grad_(True)
    b.requires_grad_(True)
    f.requires_grad_(True)
    conf, labels, verdict = OP(f, W, b, m, n, t)
    assert not conf.requires_grad and conf.grad_fn is None
    ref = guard_head_reference(f.detach(), W.detach(), b.detach(), m, n, t)
    torch.testing.assert_close(conf, ref[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck(per_head):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck not available")
    args = _valid(per_head=per_head)
    torch.library.opcheck(OP.default, tuple(args))
    args[1] = args[1].clone().requires_grad_(True)
    torch.library.opcheck(OP.default, tuple(args))
    empty = make_inputs(0, 3, 5, 7, per_head=per_head, seed=1)
    torch.library.opcheck(OP.default, empty)


def test_torch_compile_fullgraph():
    def fn(f, W, b, m, n, t):
        conf, labels, verdict = guard_head(f * 2.0, W, b, m, n, t)
        return conf.max(dim=1).values, labels + 0, verdict

    args = _valid()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    want = fn(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    args3 = _valid(per_head=True)
    for a, b in zip(compiled(*args3), fn(*args3)):
        torch.testing.assert_close(a, b)


def test_export():
    class Guard(torch.nn.Module):
        def forward(self, f, W, b, m, n, t):
            return OP(f, W, b, m, n, t)

    args = tuple(_valid())
    ep = torch.export.export(Guard(), args)
    assert any("linkbreaker.guard_head" in str(node.target) for node in ep.graph.nodes)
    for a, b in zip(ep.module()(*args), OP(*args)):
        torch.testing.assert_close(a, b)


def test_backend_info():
    info = backend_info()
    assert info["cpu_kernel"] is True
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_kernel"] is True
        assert info["compiled_with_cuda_version"] is not None
    else:
        assert info["cuda_kernel"] is False
