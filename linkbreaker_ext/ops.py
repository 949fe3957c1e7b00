"""Python front-end of the compiled LinkBreaker guard-head op.

``torch.ops.linkbreaker.guard_head(features, weight, bias, masks, noise, thresholds)``
returns ``(conf, labels, verdict)``:

* ``features`` ``[B, D]`` (one feature vector per input, shared by all heads) or
  ``[B, N, D]`` (one per head); ``weight`` ``[C, D]`` and ``bias`` ``[C]`` are the
  model's final linear layer; ``masks`` ``[N, D]`` in ``[0, 1]`` (head ``k`` is class
  ``k``, ``N <= C``); ``noise`` ``[D]``; ``thresholds`` ``[N]``.
* ``z[b,k] = weight @ (masks[k] * f[b,k] + (1 - masks[k]) * noise) + bias``,
  ``conf[b,k] = softmax(z[b,k])[k]`` (float32 ``[B, N]``); head ``k`` is credible
  when ``conf[b,k] >= thresholds[k]``.
* ``verdict[b]``: 0 = accept (exactly one credible head), 1 = trigger alarm (two or
  more), 2 = out-of-distribution (none). ``labels[b]``: the credible class for 0,
  ``-1`` for 1, ``argmax_k conf[b,k]`` (ties -> smallest k) for 2. int64 ``[B]``.
* Rows whose logits are not all finite yield ``conf = NaN``, ``label = -1``,
  ``verdict = 2``.

Everything is computed in float32 (features may be fp32/fp16/bf16; the other tensors
any floating dtype; the checked entry point accepts fp16/bf16/fp32/fp64 only). The op is not differentiable (outputs carry no grad_fn).

Checks: the op itself checks shapes, dtypes and devices in C++; its CPU kernel also
checks that thresholds are finite and masks lie in ``[0, 1]`` (eagerly) and that features
are finite (only when some row's logits came out non-finite, which a NaN or Inf feature
always causes), its CUDA kernel does not (that would need a host sync).
:func:`guard_head` -- the *checked entry point* -- validates types, ranks, shapes,
dtypes and devices in Python before dispatch (``TypeError`` for a non-tensor,
``ValueError`` naming the argument and the shapes otherwise), so no error a caller
sees depends on how the C++ side formats its exceptions (on some torch builds a
``TORCH_CHECK`` message that formats an integer crashes the process). With
``check_values=True`` it also checks the values, on every device (one host sync on
CUDA), raising ``ValueError``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from . import _C  # noqa: F401  (loads the library; registers torch.ops.linkbreaker.*)

__all__ = ["guard_head", "guard_head_reference", "backend_info"]

_OP = "linkbreaker::guard_head"

VERDICT_ACCEPT = 0
VERDICT_ALARM = 1
VERDICT_OOD = 2


@torch.library.register_fake(_OP)
def _guard_head_fake(features, weight, bias, masks, noise, thresholds):
    torch._check(features.dim() in (2, 3), lambda: "guard_head: features must be 2-D or 3-D")
    torch._check(weight.dim() == 2, lambda: "guard_head: weight must be 2-D [C, D]")
    torch._check(masks.dim() == 2, lambda: "guard_head: masks must be 2-D [N, D]")
    torch._check(
        features.shape[-1] == weight.shape[1],
        lambda: "guard_head: features last dim must equal weight.size(1)",
    )
    B = features.shape[0]
    N = masks.shape[0]
    conf = features.new_empty((B, N), dtype=torch.float32)
    labels = features.new_empty((B,), dtype=torch.int64)
    verdict = features.new_empty((B,), dtype=torch.int64)
    return conf, labels, verdict


_ARGS = ("features", "weight", "bias", "masks", "noise", "thresholds")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def _check_inputs(features, weight, bias, masks, noise, thresholds) -> None:
    """The op's contract, checked in Python: the same rules (and wording) as the C++ checks,
    but raised as TypeError/ValueError here, so no error path goes through C++ formatting."""
    args = (features, weight, bias, masks, noise, thresholds)
    for name, t in zip(_ARGS, args):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"guard_head: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in zip(_ARGS, args):
        if t.layout != torch.strided:
            raise ValueError(f"guard_head: {name} must be a dense (strided) tensor, got layout "
                             f"{t.layout}")
        if t.dtype not in _DTYPES:  # float8 too: the value checks cannot even compare it
            raise ValueError(f"guard_head: {name} must be a floating-point tensor "
                             f"(float32/float16/bfloat16/float64), got {t.dtype}")
    for name, t in zip(_ARGS, args):
        if t.device != features.device:
            raise ValueError(f"guard_head: all tensors must be on the same device, but features "
                             f"is on {features.device} and {name} is on {t.device}")
    if weight.dim() != 2:
        raise ValueError(f"guard_head: weight must be 2-D [C, D], got shape {_shape(weight)}")
    C, D = weight.shape
    if C < 1:
        raise ValueError(f"guard_head: weight must have at least one class (C >= 1), got shape "
                         f"{_shape(weight)}")
    if bias.dim() != 1 or bias.shape[0] != C:
        raise ValueError(f"guard_head: bias must be 1-D [C] with C = weight.size(0) = {C}, got "
                         f"shape {_shape(bias)}")
    if masks.dim() != 2:
        raise ValueError(f"guard_head: masks must be 2-D [N, D], got shape {_shape(masks)}")
    N = masks.shape[0]
    if N < 1:
        raise ValueError("guard_head: masks must hold at least one head (N == 0 is not allowed), "
                         f"got shape {_shape(masks)}")
    if N > C:
        raise ValueError(f"guard_head: masks has N = {N} heads but weight has only C = {C} "
                         f"classes (head k is class k, so N <= C is required)")
    if masks.shape[1] != D:
        raise ValueError(f"guard_head: masks must be [N, D] with D = weight.size(1) = {D}, got "
                         f"shape {_shape(masks)}")
    if noise.dim() != 1 or noise.shape[0] != D:
        raise ValueError(f"guard_head: noise must be 1-D [D] with D = weight.size(1) = {D}, got "
                         f"shape {_shape(noise)}")
    if thresholds.dim() != 1 or thresholds.shape[0] != N:
        raise ValueError(f"guard_head: thresholds must be 1-D [N] with N = masks.size(0) = {N}, "
                         f"got shape {_shape(thresholds)}")
    if features.dim() not in (2, 3):
        raise ValueError(f"guard_head: features must be 2-D [B, D] or 3-D [B, N, D], got shape "
                         f"{_shape(features)}")
    if features.shape[-1] != D:
        raise ValueError(f"guard_head: features last dim ({features.shape[-1]}) must equal "
                         f"weight.size(1) = D = {D} (features shape {_shape(features)}, weight "
                         f"shape {_shape(weight)})")
    if features.dim() == 3 and features.shape[1] != N:
        raise ValueError(f"guard_head: 3-D features must be [B, N, D] with N = masks.size(0) = "
                         f"{N}, got shape {_shape(features)}")


def _check_values(features, masks, thresholds) -> None:
    """NaN/Inf and mask-range checks, one host sync (the CUDA kernel does not check values)."""
    ok = torch.stack(
        [
            torch.isfinite(features).all(),
            torch.isfinite(thresholds).all(),
            ((masks >= 0) & (masks <= 1)).all(),
        ]
    ).cpu()  # the single host sync
    if not bool(ok[0]):
        raise ValueError("guard_head: features contain NaN or Inf")
    if not bool(ok[1]):
        raise ValueError("guard_head: thresholds contain NaN or Inf (must be finite)")
    if not bool(ok[2]):
        raise ValueError("guard_head: masks must have all values in [0, 1] (and no NaN)")


def guard_head(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    masks: torch.Tensor,
    noise: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    check_values: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked entry point for ``torch.ops.linkbreaker.guard_head`` (see module doc).

    Always validates types, ranks, shapes, dtypes and devices in Python (no sync):
    ``TypeError`` for a non-tensor argument, ``ValueError`` naming the argument and
    the shapes for anything else. ``check_values=True`` (default) also validates the
    *values* (features finite, thresholds finite, masks in [0, 1]; ``ValueError``) at
    the cost of one host sync on CUDA; with ``check_values=False`` the CPU kernel still
    refuses such values (``RuntimeError``) and the CUDA kernel returns non-finite rows
    as ``conf=NaN, label=-1, verdict=2``. Value checks are skipped under torch.compile.
    """
    _check_inputs(features, weight, bias, masks, noise, thresholds)
    if check_values and not torch.compiler.is_compiling() and features.device.type != "meta":
        _check_values(features, masks, thresholds)
    return torch.ops.linkbreaker.guard_head(features, weight, bias, masks, noise, thresholds)


def guard_head_reference(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    masks: torch.Tensor,
    noise: torch.Tensor,
    thresholds: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch implementation of the guard-head contract (the test oracle).

    Readable and unfused: materialises the masked inputs ``[B, N, D]`` and all logits.
    Performs no input validation.
    """
    f = features.float()
    W = weight.float()
    m = masks.float()
    n = noise.float()
    thr = thresholds.float()
    N = m.shape[0]
    if f.dim() == 2:
        f = f.unsqueeze(1).expand(-1, N, -1)  # same features for every head
    x = m * f + (1 - m) * n  # [B, N, D]: salient neurons kept, the rest replaced by noise
    z = x @ W.t() + bias.float()  # [B, N, C]
    probs = torch.softmax(z, dim=-1)
    conf = torch.diagonal(probs[:, :, :N], dim1=1, dim2=2).contiguous()  # conf[b,k] = p[b,k,k]

    credible = conf >= thr  # [B, N]
    count = credible.sum(dim=1)
    first_credible = credible.to(torch.int64).argmax(dim=1)
    best = conf.argmax(dim=1)  # torch.argmax: first maximal index on ties
    verdict = torch.full_like(count, VERDICT_OOD)
    verdict[count == 1] = VERDICT_ACCEPT
    verdict[count >= 2] = VERDICT_ALARM
    labels = torch.where(
        verdict == VERDICT_ACCEPT,
        first_credible,
        torch.where(verdict == VERDICT_ALARM, torch.full_like(best, -1), best),
    )

    bad = ~torch.isfinite(z).flatten(1).all(dim=1) if z.shape[0] > 0 else count.bool()
    conf = conf.masked_fill(bad.unsqueeze(1), float("nan"))
    labels = labels.masked_fill(bad, -1)
    verdict = verdict.masked_fill(bad, VERDICT_OOD)
    return conf, labels.to(torch.int64), verdict.to(torch.int64)


def backend_info() -> Dict[str, object]:
    """What the compiled extension provides."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    cuda_compiled = bool(torch.ops.linkbreaker.cuda_compiled())
    version = int(torch.ops.linkbreaker.cuda_version())
    return {
        "cpu_kernel": bool(has_kernel(_OP, "CPU")),
        "cuda_kernel": bool(has_kernel(_OP, "CUDA")),
        "cuda_compiled": cuda_compiled,
        "compiled_with_cuda_version": (
            f"{version // 1000}.{(version % 1000) // 10}" if version > 0 else None
        ),
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
