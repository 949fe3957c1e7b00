"""Hardening (issue 9): the checked op and the guard/model files under bad input.

Property-based (hypothesis): every generated case is either refused with a clear error that
names the problem, or handled correctly (the op: equal to ``guard_head_reference``; files: the
exact tensors and metadata written). Examples are few and derandomized, so the file runs in
seconds and the same way every time.

Bad-input classes covered (numbered as in the test names' comments):

checked op ``linkbreaker_ext.guard_head``
  1 integer tensors   2 bool tensors   3 complex tensors   4 float8 tensors
  5 float64 / float16 / bfloat16 arguments (handled)      6 non-contiguous (strided) tensors
  7 channels-last views                8 expanded (stride-0) tensors
  9 empty batch (B = 0)               10 batch of one
 11 too many dims (rank + 1..2)       12 too few dims (down to 0-d)
 13 wrong size of one dim (any argument)                  14 N > C, N = 0, C = 0
 15 NaN / +Inf / -Inf in features     16 NaN / Inf in thresholds
 17 masks outside [0, 1] or NaN       18 NaN / Inf in weight, bias, noise (rows flagged)
 19 finite inputs whose logits overflow (rows flagged)    20 non-tensor arguments
 21 sparse tensors                    22 tensors on different devices
 23 inputs that require grad
files ``linkbreaker_ext.safefiles``
 24 truncated at any offset           25 flipped bytes (1-4, any position, any xor)
 26 header whitespace changed (space -> tab/newline/CR)
 27 edited metadata record (version, layer names, shapes in meta)
 28 edited tensor entries (shape, name, dtype) in the header
 29 tensor bytes swapped for out-of-range values (digest kept)
 30 out-of-range tensors in a re-digested file (no key)   31 wrong HMAC key
 32 key given, file unsigned           33 HMAC stripped or added
 34 not safetensors (random bytes, empty, pickle, JSON)   35 safetensors, another kind
 36 extra / duplicate metadata entries 37 legacy files without digest (warn / refuse)
 38 out-of-range values: masks, fills, thresholds, NaN in any float tensor
 39 wrong shapes (missing, extra, rank, size, inconsistent symbol)
 40 a pickle payload (never executed)
"""
import dataclasses
import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linkbreaker_ext import guard_head, guard_head_reference, safefiles
from linkbreaker_ext.safefiles import GuardFileError, LegacyFileWarning

FAST = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
ARGS = ("features", "weight", "bias", "masks", "noise", "thresholds")
TOL = 1e-4


# =================================================================================== the op

@st.composite
def op_inputs(draw, min_b=0):
    B = draw(st.sampled_from([min_b, 1]) | st.integers(max(min_b, 2), 6))
    N = draw(st.integers(1, 4))
    C = N + draw(st.integers(0, 3))
    D = draw(st.integers(1, 8))
    per_head = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    f = torch.randn((B, N, D) if per_head else (B, D), generator=g)
    W = torch.randn(C, D, generator=g) * (4.0 / math.sqrt(D))
    b = torch.randn(C, generator=g) * 0.5
    m = torch.rand(N, D, generator=g)
    n = torch.randn(D, generator=g)
    t = 0.05 + 0.9 * torch.rand(N, generator=g)
    return [f, W, b, m, n, t]


def assert_like_reference(out, args):
    """The op's answer equals the reference on the same values (contiguous copies); decisions
    may only differ on rows where a confidence sits within TOL of a threshold or a tie."""
    ref = guard_head_reference(*[a.detach().contiguous() for a in args])
    conf, labels, verdict = out
    rconf, rlabels, rverdict = ref
    assert conf.shape == rconf.shape and conf.dtype == torch.float32
    assert labels.dtype == torch.int64 and verdict.dtype == torch.int64
    assert labels.shape == verdict.shape == (rconf.shape[0],)
    torch.testing.assert_close(conf, rconf, atol=TOL, rtol=0, equal_nan=True)
    if rconf.shape[0] == 0:
        return
    near = ((rconf - args[5].detach().float()).abs() < TOL).any(1)
    if rconf.shape[1] > 1:
        top2 = rconf.nan_to_num(-1).topk(2, dim=1).values
        near |= (rverdict == 2) & ((top2[:, 0] - top2[:, 1]).abs() < TOL)
    ok = ~near
    assert torch.equal(verdict[ok], rverdict[ok]) and torch.equal(labels[ok], rlabels[ok])


def _strided(t):
    """Same values, a stride-2 view (class 6)."""
    big = torch.zeros(*t.shape, 2, dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


def _channels_last(t):
    """Same values, a view into a channels-last 4-D buffer (class 7)."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(-1, 1)
    buf = torch.zeros(*flat.shape, 2, 2, dtype=t.dtype).to(memory_format=torch.channels_last)
    buf[:, :, 1, 1] = flat
    return buf[:, :, 1, 1].view(t.shape)


def _expanded(t):
    """Stride-0 along the first dim (values become copies of the first row; class 8)."""
    if t.dim() == 0 or t.shape[0] == 0:
        return t
    return t[:1].expand_as(t)


LAYOUTS = {"contiguous": lambda t: t, "strided": _strided, "channels_last": _channels_last,
           "expanded": _expanded, "float64": lambda t: t.double(), "float16": lambda t: t.half(),
           "bfloat16": lambda t: t.bfloat16(),
           "requires_grad": lambda t: t.clone().requires_grad_(True)}


@FAST
@given(op_inputs(), st.lists(st.sampled_from(sorted(LAYOUTS)), min_size=6, max_size=6))
def test_layouts_and_float_dtypes_match_reference(args, layouts):
    """Classes 5-10, 23: any layout or float dtype of any argument, empty batches and batches of
    one give the reference's answer."""
    args = [LAYOUTS[name](a) for name, a in zip(layouts, args)]
    if "expanded" in layouts[3:4]:
        assert args[3].stride(0) == 0
    out = guard_head(*args)
    assert not any(o.requires_grad for o in out)
    assert_like_reference(out, args)


@pytest.mark.parametrize("B", [0, 1])
@pytest.mark.parametrize("per_head", [False, True])
def test_empty_batch_and_batch_of_one(B, per_head):
    """Classes 9-10, always (hypothesis draws them too, but not necessarily)."""
    f = torch.randn((B, 2, 4) if per_head else (B, 4))
    args = [f, torch.randn(3, 4), torch.randn(3), torch.rand(2, 4), torch.randn(4),
            torch.full((2,), 0.4)]
    conf, labels, verdict = out = guard_head(*args)
    assert conf.shape == (B, 2) and labels.shape == verdict.shape == (B,)
    assert_like_reference(out, args)


def test_channels_last_helper_really_is_channels_last_memory():
    t = torch.randn(3, 5)
    v = _channels_last(t)
    assert torch.equal(v, t) and not v.is_contiguous()


BAD_DTYPES = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64,
              torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]


@FAST
@given(op_inputs(), st.integers(0, 5), st.sampled_from(BAD_DTYPES))
def test_non_float_dtypes_refused(args, i, dtype):
    """Classes 1-4: integer, bool, complex and float8 tensors are refused, naming the argument."""
    args[i] = args[i].to(dtype) if dtype != torch.bool else args[i] > 0.5
    with pytest.raises(ValueError, match=rf"guard_head: {ARGS[i]} must be a floating-point "
                                         rf"tensor .*got {dtype}"):
        guard_head(*args)


def _contract_holds(f, W, b, m, n, t):
    """The op's shape contract, spelt independently of ops.py (the test oracle)."""
    if W.dim() != 2 or W.shape[0] < 1 or m.dim() != 2:
        return False
    C, D = W.shape
    N = m.shape[0]
    return (tuple(b.shape) == (C,) and 1 <= N <= C and m.shape[1] == D
            and tuple(n.shape) == (D,) and tuple(t.shape) == (N,) and f.dim() in (2, 3)
            and f.shape[-1] == D and (f.dim() == 2 or f.shape[1] == N))


@st.composite
def reshaped(draw, t):
    """``t`` with one more or fewer dim, or one dim resized (values are random)."""
    shape = list(t.shape)
    kind = draw(st.sampled_from(["add", "drop", "resize"] if shape else ["add"]))
    if kind == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
        if draw(st.booleans()):
            shape.append(draw(st.integers(1, 2)))
    elif kind == "drop":
        del shape[draw(st.integers(0, len(shape) - 1))]
    else:
        k = draw(st.integers(0, len(shape) - 1))
        shape[k] = max(0, shape[k] + draw(st.sampled_from([-2, -1, 1, 2])))
    return torch.rand(shape)


@FAST
@given(st.data(), op_inputs(), st.integers(0, 5))
def test_any_shape_refused_or_correct(data, args, i):
    """Classes 11-14: a wrong rank or size of any argument is refused with a ValueError that names
    an argument and the numbers; a shape the contract allows gives the reference's answer."""
    args[i] = data.draw(reshaped(args[i]))
    if _contract_holds(*args):
        assert_like_reference(guard_head(*args), args)
    else:
        with pytest.raises(ValueError, match=r"guard_head: .*(" + "|".join(ARGS) + r").*\d"):
            guard_head(*args)


@pytest.mark.parametrize("i,bad,match", [
    (1, torch.zeros(0, 4), r"at least one class \(C >= 1\), got shape \[0, 4\]"),
    (3, torch.zeros(0, 4), r"at least one head"),
    (3, torch.zeros(5, 4), r"masks has N = 5 heads but weight has only C = 3"),
    (0, torch.zeros(2, 4, 1, 1).to(memory_format=torch.channels_last),
     r"features must be 2-D \[B, D\] or 3-D \[B, N, D\], got shape \[2, 4, 1, 1\]"),
    (0, torch.zeros(()), r"features must be 2-D .*got shape \[\]"),
])
def test_degenerate_shapes_messages(i, bad, match):
    """Class 14 (and a 4-D channels-last image given as features): exact messages."""
    args = [torch.rand(2, 4), torch.rand(3, 4), torch.rand(3), torch.rand(2, 4), torch.rand(4),
            torch.rand(2)]
    args[i] = bad
    with pytest.raises(ValueError, match=match):
        guard_head(*args)


@FAST
@given(op_inputs(min_b=1), st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       st.data())
def test_non_finite_features_and_thresholds_refused(args, value, data):
    """Classes 15-16."""
    which = data.draw(st.sampled_from([0, 5]))
    t = args[which].clone().reshape(-1)
    t[data.draw(st.integers(0, t.numel() - 1))] = value
    args[which] = t.reshape(args[which].shape)
    with pytest.raises(ValueError, match=f"guard_head: {ARGS[which]} contain NaN or Inf"):
        guard_head(*args)


@FAST
@given(op_inputs(), st.sampled_from([-1e-6, -1.0, 1.000001, 2.0, float("nan"), float("inf")]),
       st.data())
def test_masks_out_of_range_refused(args, value, data):
    """Class 17."""
    m = args[3].clone().reshape(-1)
    m[data.draw(st.integers(0, m.numel() - 1))] = value
    args[3] = m.reshape(args[3].shape)
    with pytest.raises(ValueError, match=r"guard_head: masks must have all values in \[0, 1\]"):
        guard_head(*args)


@FAST
@given(op_inputs(min_b=1), st.sampled_from([1, 2, 4]),
       st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30]), st.data())
def test_non_finite_parameters_flagged_like_reference(args, i, value, data):
    """Classes 18-19: NaN/Inf (or overflowing) weight, bias or noise are not input errors; the
    affected rows come back as conf NaN, label -1, verdict 2, exactly as the reference."""
    t = args[i].clone().reshape(-1)
    t[data.draw(st.integers(0, t.numel() - 1))] = value
    args[i] = t.reshape(args[i].shape)
    out = guard_head(*args)
    assert_like_reference(out, args)
    conf, labels, verdict = out
    flagged = torch.isnan(conf).any(1)
    assert torch.all(labels[flagged] == -1) and torch.all(verdict[flagged] == 2)


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], 3.0, "x"])
@pytest.mark.parametrize("i", range(6))
def test_non_tensor_arguments_refused(i, bad):
    """Class 20."""
    args = [torch.rand(2, 4), torch.rand(3, 4), torch.rand(3), torch.rand(2, 4), torch.rand(4),
            torch.rand(2)]
    args[i] = bad
    with pytest.raises(TypeError, match=f"guard_head: {ARGS[i]} must be a torch.Tensor, got "
                                        f"{type(bad).__name__}"):
        guard_head(*args)


@pytest.mark.parametrize("i", range(6))
def test_sparse_and_other_device_refused(i):
    """Classes 21-22 (the meta device stands in for a second device on a CPU-only machine)."""
    args = [torch.rand(2, 4), torch.rand(3, 4), torch.rand(3), torch.rand(2, 4), torch.rand(4),
            torch.rand(2)]
    sparse = list(args)
    sparse[i] = sparse[i].to_sparse()
    with pytest.raises(ValueError, match=f"guard_head: {ARGS[i]} must be a dense"):
        guard_head(*sparse)
    moved = list(args)
    moved[i] = moved[i].to("meta")
    other = "weight" if i == 0 else ARGS[i]
    with pytest.raises(ValueError, match=f"same device, but features is on "
                                         f"{moved[0].device} and {other} is on"):
        guard_head(*moved)


# ================================================================================== files

KIND = "linkbreaker-guard"
WHAT = "LinkBreaker guard"


def guard_tensors(seed=0, N=3, P=6, D=5):
    g = torch.Generator().manual_seed(seed)
    return {"early_masks": (torch.rand(N, P, generator=g) < 0.5).float(),
            "late_masks": torch.rand(N, D, generator=g),
            "early_fill": torch.randn(P, generator=g), "late_fill": torch.randn(D, generator=g),
            "thresholds": 0.05 + 0.9 * torch.rand(N, generator=g)}


META = {"format": KIND, "version": 1, "early_layer": "relu1", "late_layer": "fc2",
        "input_shape": [1, 12, 12], "model_sha256": "ab" * 32, "fit_s": 1.5,
        "config": {"mad_k": 3.0, "fractions": [0.1, 1.0]}}


def read(path, **kw):
    return safefiles.read(path, KIND, WHAT, "guard", **kw)


def split(data: bytes):
    """``(header dict, data buffer)`` of a safetensors file's bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, buffer: bytes) -> bytes:
    """Compact JSON padded with spaces, the way safetensors writes a header."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + buffer


@pytest.fixture
def signed(tmp_path):
    """A small guard-like file signed with key b"k1", and its bytes."""
    path = safefiles.write(tmp_path / "g.safetensors", guard_tensors(), KIND, META, key=b"k1")
    return path, path.read_bytes()


def assert_refused(path, data: bytes, match=None, **kw):
    path.write_bytes(data)
    with pytest.raises(GuardFileError, match=match) as e:
        read(path, **kw)
    assert str(path) in str(e.value)


NAMES = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"),
                              whitelist_characters="_.-/ é"), min_size=1, max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3)
                    | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=8)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool]


@st.composite
def tensor_dicts(draw):
    out = {}
    for name in draw(st.lists(NAMES, min_size=0, max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
        out[name] = (torch.randn(shape, generator=g) * 100).to(dtype)
    return out


@FAST
@given(tensor_dicts(), st.dictionaries(st.text(max_size=6), JSON, max_size=4),
       st.none() | st.binary(min_size=1, max_size=16) | st.text(min_size=1, max_size=8))
def test_round_trip_identical(tmp_path_factory, tensors, meta, key):
    """What is written is read back bit-identical (any dtype, empty and 0-d tensors, unicode
    names, any JSON metadata), with and without a key, and without warnings."""
    path = tmp_path_factory.mktemp("rt") / "f.safetensors"
    safefiles.write(path, tensors, KIND, meta, key=key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, got_meta = read(path, key=key)
        read(path)  # a signed file still reads without the key (digest checked)
    assert got_meta == meta
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t)


def test_key_str_equals_utf8_bytes_and_bad_keys(tmp_path):
    path = safefiles.write(tmp_path / "g.safetensors", guard_tensors(), KIND, META, key="clé")
    read(path, key="clé".encode())
    with pytest.raises(TypeError, match="key must be bytes or str"):
        read(path, key=123)
    with pytest.raises(ValueError, match="key must not be empty"):
        safefiles.write(path, guard_tensors(), KIND, META, key=b"")


@FAST
@given(st.data())
def test_truncated_refused(signed, data):
    """Class 24: any prefix of the file is refused."""
    path, raw = signed
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert_refused(path, raw[:cut])


@FAST
@given(st.data())
def test_flipped_bytes_refused(signed, data):
    """Class 25: 1-4 bytes anywhere, xor'ed with anything, are refused (with or without key)."""
    path, raw = signed
    buf = bytearray(raw)
    for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4,
                                  unique=True)):
        buf[pos] ^= data.draw(st.integers(1, 255))
    assert_refused(path, bytes(buf), key=data.draw(st.sampled_from([None, b"k1"])))


def test_every_single_byte_flip_refused(signed):
    """Classes 25-26, exhaustively on one file: every position's lowest bit flipped, and every
    space (the header's padding) turned into each of the other JSON whitespace bytes."""
    path, raw = signed
    for pos in range(len(raw)):
        variants = [raw[pos] ^ 0x01]
        if raw[pos] == 0x20:
            variants += [0x09, 0x0A, 0x0D]
        for v in variants:
            path.write_bytes(raw[:pos] + bytes([v]) + raw[pos + 1:])
            with pytest.raises(GuardFileError):
                read(path)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(version=2), lambda m: m.update(early_layer="input"),
    lambda m: m.update(input_shape=[3, 32, 32]), lambda m: m.pop("model_sha256"),
    lambda m: m["config"].update(mad_k=0.0)])
def test_edited_metadata_refused(signed, edit):
    """Class 27: the JSON record edited in place (digest and HMAC left as they were)."""
    path, raw = signed
    header, buffer = split(raw)
    meta = json.loads(header["__metadata__"][KIND])
    edit(meta)
    header["__metadata__"][KIND] = json.dumps(meta)
    assert_refused(path, join(header, buffer), "content digest mismatch")


def _reshape(h):
    h["late_masks"]["shape"] = h["late_masks"]["shape"][::-1]


def _rename(h):
    h["late_fill2"] = h.pop("late_fill")


def _retype(h):
    h["thresholds"]["dtype"] = "I32"


@pytest.mark.parametrize("edit", [_reshape, _rename, _retype], ids=["shape", "name", "dtype"])
def test_edited_tensor_entries_refused(signed, edit):
    """Class 28: the header's tensor entries edited (the file stays valid safetensors)."""
    path, raw = signed
    header, buffer = split(raw)
    edit(header)
    assert_refused(path, join(header, buffer), "content digest mismatch")


@FAST
@given(st.sampled_from(["late_masks", "early_masks", "early_fill", "thresholds"]),
       st.sampled_from([float("nan"), float("inf"), -0.5, 1.5, 0.0]))
def test_swapped_tensor_refused(tmp_path_factory, name, value):
    """Classes 29-31: a tensor replaced by out-of-range values is refused: by the digest when the
    bytes are swapped in place, by the range check when the file is re-digested without a key,
    and by the HMAC when a key is required."""
    path = tmp_path_factory.mktemp("sw") / "g.safetensors"
    good = guard_tensors()
    safefiles.write(path, good, KIND, META, key=b"k1")
    header, buffer = split(path.read_bytes())
    lo, hi = header[name]["data_offsets"]
    bad = dict(good, **{name: torch.full_like(good[name], value)})
    buffer = buffer[:lo] + bad[name].numpy().tobytes() + buffer[hi:]
    assert_refused(path, join(header, buffer), "content digest mismatch")
    # an attacker without the key re-writes the file, digest and all
    safefiles.write(path, bad, KIND, META)
    tensors, _ = read(path)
    allowed = {"fill": math.isfinite(value), "masks": 0 <= value <= 1,
               "thresholds": 0 < value <= 1}[name.split("_")[-1]]
    if allowed:
        safefiles.check_tensor_ranges(tensors, path)
    else:
        with pytest.raises(GuardFileError, match=name):
            safefiles.check_tensor_ranges(tensors, path)
    with pytest.raises(GuardFileError, match="no HMAC signature, but a key was given"):
        read(path, key=b"k1")
    safefiles.write(path, bad, KIND, META, key=b"attacker")
    with pytest.raises(GuardFileError, match="HMAC signature does not match"):
        read(path, key=b"k1")


def test_hmac_stripped_or_added_refused(signed):
    """Class 33: removing the HMAC (or adding one) breaks the digest, which covers it."""
    path, raw = signed
    header, buffer = split(raw)
    stripped = json.loads(json.dumps(header))
    del stripped["__metadata__"][KIND + safefiles.HMAC_SUFFIX]
    assert_refused(path, join(stripped, buffer), "content digest mismatch")
    forged = json.loads(json.dumps(header))
    forged["__metadata__"][KIND + safefiles.HMAC_SUFFIX] = "0" * 64
    assert_refused(path, join(forged, buffer), "content digest mismatch")
    # the digest alone must be recomputable only with the MAC it was written with
    path.write_bytes(raw)
    read(path, key=b"k1")
    with pytest.raises(GuardFileError, match="HMAC signature does not match"):
        read(path, key=b"k2")


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_refused(tmp_path_factory, blob):
    """Class 34."""
    path = tmp_path_factory.mktemp("rb") / "g.safetensors"
    assert_refused(path, blob, "not a LinkBreaker guard file")


class _Boom:
    """Unpickling this creates a marker file: proof that nothing unpickles guard files."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_other_files_refused_and_never_executed(tmp_path):
    """Classes 34-36, 40."""
    marker = tmp_path / "executed"
    path = tmp_path / "g.safetensors"
    payload = pickle.dumps(_Boom(str(marker)))
    assert_refused(path, payload, "not a LinkBreaker guard file")
    torch.save({"early_masks": torch.ones(2)}, path)
    assert_refused(path, path.read_bytes(), "not a LinkBreaker guard file")
    assert_refused(path, b"", "not a LinkBreaker guard file")
    assert_refused(path, json.dumps({"__metadata__": {}}).encode(), "not a LinkBreaker guard")
    # a valid file whose tensors and metadata hold the pickle: returned as data, never run
    tensors = {"blob": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    safefiles.write(path, tensors, KIND, {"blob": payload.decode("latin-1")})
    got, meta = read(path)
    assert bytes(got["blob"].numpy()) == payload and not marker.exists()
    # another kind of file
    safefiles.write(path, guard_tensors(), "linkbreaker-model", META)
    with pytest.raises(GuardFileError, match="safetensors file but not a LinkBreaker guard"):
        read(path)
    # extra and duplicate metadata entries
    header, buffer = split(safefiles.write(path, guard_tensors(), KIND, META).read_bytes())
    header["__metadata__"]["note"] = "hi"
    assert_refused(path, join(header, buffer), "unexpected metadata entries")
    del header["__metadata__"]["note"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw = raw.replace(b'"__metadata__":{', b'"__metadata__":{"' + KIND.encode() + b'":"{}",', 1)
    raw += b" " * (-len(raw) % 8)
    assert_refused(path, len(raw).to_bytes(8, "little") + raw + buffer, "duplicate JSON key")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="no guard file"):
        read(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no guard file"):
        read(tmp_path)


def test_legacy_files(tmp_path):
    """Class 37: a file from before the digest (metadata holds only the JSON record) loads with a
    LegacyFileWarning; it is refused with a key or with allow_legacy=False."""
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file(guard_tensors(), str(path), metadata={KIND: json.dumps(META)})
    with pytest.warns(LegacyFileWarning, match="no content digest"):
        tensors, meta = read(path)
    assert meta == META and torch.equal(tensors["thresholds"], guard_tensors()["thresholds"])
    with pytest.raises(GuardFileError, match="no content digest or HMAC signature, but a key"):
        read(path, key=b"k1")
    with pytest.raises(GuardFileError, match="no content digest"):
        read(path, allow_legacy=False)
    save_file(guard_tensors(), str(path), metadata={KIND: json.dumps(META),
                                                    KIND + safefiles.HMAC_SUFFIX: "0" * 64})
    with pytest.raises(GuardFileError, match="HMAC but no content digest"):
        read(path)


# ============================================================================ value checks

BAD_VALUES = {"mask": [-1e-6, 1.0001, float("nan"), float("inf"), -float("inf")],
              "fill": [float("nan"), float("inf"), -float("inf")],
              "threshold": [0.0, -0.1, 1.0001, float("nan"), float("inf")],
              "other": [float("nan"), float("inf")]}
NAME_OF = {"mask": ["early_masks", "late_masks", "masks.relu1"],
           "fill": ["early_fill", "fill.input"], "threshold": ["thresholds"],
           "other": ["weight", "profile.mask_head"]}


@FAST
@given(st.sampled_from(sorted(BAD_VALUES)), st.data())
def test_check_tensor_ranges_refuses_out_of_range(rule, data):
    """Class 38."""
    name = data.draw(st.sampled_from(NAME_OF[rule]))
    value = data.draw(st.sampled_from(BAD_VALUES[rule]))
    tensors = dict(guard_tensors(), weight=torch.randn(3, 5), **{
        "masks.relu1": torch.rand(2, 2), "fill.input": torch.randn(4),
        "profile.mask_head": torch.randn(3) * 5})  # a profile is no mask, whatever its layer
    t = tensors[name].clone().reshape(-1)
    t[data.draw(st.integers(0, t.numel() - 1))] = value
    tensors[name] = t.reshape(tensors[name].shape)
    with pytest.raises(GuardFileError, match=f"^g.safetensors: {name} "):
        safefiles.check_tensor_ranges(tensors, "g.safetensors")


def test_check_tensor_ranges_accepts_edges_and_refuses_integer_masks():
    ok = dict(guard_tensors(), steps=torch.tensor([1, 2]), empty_fill=torch.zeros(0),
              **{"profile.mask_head": torch.tensor([-3.0, 7.0])})
    ok["late_masks"][0, 0], ok["late_masks"][0, 1], ok["thresholds"][0] = 0.0, 1.0, 1.0
    safefiles.check_tensor_ranges(ok)
    with pytest.raises(GuardFileError, match="early_masks must be a floating-point tensor"):
        safefiles.check_tensor_ranges(dict(ok, early_masks=torch.ones(2, 2, dtype=torch.int64)))


EXPECTED = {"early_masks": ("N", None), "late_masks": ("N", "D"), "early_fill": (None,),
            "late_fill": ("D",), "thresholds": ("N",)}


def test_check_shapes():
    """Class 39."""
    t = guard_tensors(N=3, P=6, D=5)
    assert safefiles.check_shapes(t, EXPECTED) == {"N": 3, "D": 5}
    assert safefiles.check_shapes(t, dict(EXPECTED, late_fill=(5,))) == {"N": 3, "D": 5}
    cases = [
        (dict(t, thresholds=torch.rand(4)), r"thresholds has shape \[4\], expected \[N=3\]"),
        (dict(t, late_fill=torch.rand(5, 1)), r"late_fill has shape \[5, 1\], expected \[D\]"),
        (dict(t, late_masks=torch.rand(3, 4)),
         r"late_masks has shape \[3, 4\], expected \[N=3, D=5\]"),
        ({k: v for k, v in t.items() if k != "late_fill"}, r"missing tensor\(s\) \['late_fill'\]"),
        (dict(t, extra=torch.rand(1)), r"unexpected tensor\(s\) \['extra'\]"),
    ]
    for tensors, match in cases:
        with pytest.raises(GuardFileError, match="^f: " + match):
            safefiles.check_shapes(tensors, EXPECTED, "f")
    with pytest.raises(GuardFileError, match=r"early_fill has shape \[6\], expected \[7\]"):
        safefiles.check_shapes(t, dict(EXPECTED, early_fill=(7,)))


def test_guard_load_refuses_damaged_files(tmp_path):
    """End to end: ``LinkBreaker.load`` reads through ``safefiles.read``, so a truncated, flipped
    or edited guard file is refused before any of it is used."""
    from linkbreaker_ext.guard import FORMAT, LinkBreaker

    path = safefiles.write(tmp_path / "guard.safetensors", guard_tensors(), FORMAT, META)
    raw = path.read_bytes()
    header, buffer = split(raw)
    meta = json.loads(header["__metadata__"][FORMAT])
    meta["late_layer"] = "0"
    header["__metadata__"][FORMAT] = json.dumps(meta)
    for bad in (raw[:-3], raw[:40] + bytes([raw[40] ^ 4]) + raw[41:],
                raw[:-1] + bytes([raw[-1] ^ 1]), join(header, buffer)):
        path.write_bytes(bad)
        with pytest.raises(GuardFileError, match=str(path)):
            LinkBreaker.load(path, torch.nn.Linear(2, 2))


def test_out_of_memory_names_the_setting_to_lower(guard_deep, synth, monkeypatch):
    """A device OOM inside guard(x) or fit comes back naming GuardConfig.batch_rows (simulated: no
    GPU is needed to check the message)."""
    from linkbreaker_ext import guard as guard_mod
    from linkbreaker_ext.guard import LinkBreaker

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    g = dataclasses.replace(guard_deep.config, batch_rows=512)
    monkeypatch.setattr(guard_deep, "config", g)
    monkeypatch.setattr(guard_deep, "_heads_with_deviations", boom)
    with pytest.raises(torch.OutOfMemoryError, match=r"guard\(x\).*batch_rows=512.*batch_rows = 128.*Tried to allocate"):
        guard_deep(synth["x_test"][:4])
    monkeypatch.setattr("linkbreaker_ext.fitting.generate_neighbours", boom)
    with pytest.raises(torch.OutOfMemoryError, match=r"LinkBreaker.fit.*batch_rows=64.*batch_rows=16"):
        LinkBreaker.fit(guard_deep.model, synth["x_val"], synth["y_val"], 3, progress=False, batch_rows=64)
    with pytest.raises(torch.OutOfMemoryError, match=r"batch_rows=None \(8192 on a GPU\).*batch_rows=2048"):
        with guard_mod.explain_out_of_memory("LinkBreaker.fit", None):
            boom()


def test_guard_files_are_written_atomically(guard_deep, deep_net, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous file intact and no temporary file behind."""
    from linkbreaker_ext import LinkBreaker
    import safetensors.torch

    path = tmp_path / "g.safetensors"
    guard_deep.save(path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        guard_deep.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]
    monkeypatch.undo()
    assert LinkBreaker.load(path, deep_net).num_heads == guard_deep.num_heads
