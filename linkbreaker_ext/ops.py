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
any floating dtype). The op is not differentiable (outputs carry no grad_fn).

Value checks: the CPU kernel checks eagerly that features are finite, thresholds are
finite and masks lie in ``[0, 1]``. The CUDA kernel does not (that would need a host
sync); :func:`guard_head` -- the *checked entry point* -- performs those checks for
CUDA tensors (one device->host sync) before calling the op. Shape, dtype and
device checks are always done in C++ without a sync.
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


def _check_values(features, masks, thresholds) -> None:
    """NaN/Inf and mask-range checks for devices whose kernel does not check eagerly."""
    ok = torch.stack(
        [
            torch.isfinite(features).all(),
            torch.isfinite(thresholds).all(),
            ((masks >= 0) & (masks <= 1)).all(),
        ]
    ).cpu()  # the single host sync
    if not bool(ok[0]):
        raise RuntimeError("guard_head: features contain NaN or Inf")
    if not bool(ok[1]):
        raise RuntimeError("guard_head: thresholds contain NaN or Inf (must be finite)")
    if not bool(ok[2]):
        raise RuntimeError("guard_head: masks must have all values in [0, 1] (and no NaN)")


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

    On CUDA, ``check_values=True`` (default) validates the tensor *values*
    (features finite, thresholds finite, masks in [0, 1]) at the cost of one host
    sync; pass ``check_values=False`` to skip it (non-finite rows then come back as
    ``conf=NaN, label=-1, verdict=2``). Skipped automatically under torch.compile.
    """
    if (
        check_values
        and features.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and all(
            isinstance(t, torch.Tensor) and t.device == features.device
            for t in (masks, thresholds)
        )
        and all(t.is_floating_point() for t in (features, masks, thresholds))
    ):
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
