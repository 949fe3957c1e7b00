// LinkBreaker guard head: op schema (registered once), shared input validation,
// the folded GEMM that produces every head's logits, and the Autograd kernel.
#include "guard_head.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <utility>

namespace linkbreaker {

namespace {

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      "guard_head: ", name, " must be a floating-point tensor (float32/float16/bfloat16/float64), got ",
      t.scalar_type());
}

} // namespace

void check_guard_head_inputs(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise,
    const at::Tensor& thresholds) {
  const std::array<std::pair<const at::Tensor*, const char*>, 6> args = {{
      {&features, "features"},
      {&weight, "weight"},
      {&bias, "bias"},
      {&masks, "masks"},
      {&noise, "noise"},
      {&thresholds, "thresholds"},
  }};
  for (const auto& a : args) {
    TORCH_CHECK(a.first->defined(), "guard_head: ", a.second, " is an undefined tensor");
  }
  for (const auto& a : args) {
    check_floating(*a.first, a.second);
  }
  for (const auto& a : args) {
    TORCH_CHECK(
        a.first->device() == features.device(),
        "guard_head: all tensors must be on the same device, but features is on ",
        features.device(), " and ", a.second, " is on ", a.first->device());
  }

  TORCH_CHECK(
      weight.dim() == 2, "guard_head: weight must be 2-D [C, D], got shape ", weight.sizes());
  const int64_t C = weight.size(0);
  const int64_t D = weight.size(1);
  TORCH_CHECK(C >= 1, "guard_head: weight must have at least one class (C >= 1), got shape ", weight.sizes());
  TORCH_CHECK(
      bias.dim() == 1 && bias.size(0) == C,
      "guard_head: bias must be 1-D [C] with C = weight.size(0) = ", C, ", got shape ", bias.sizes());
  TORCH_CHECK(
      masks.dim() == 2, "guard_head: masks must be 2-D [N, D], got shape ", masks.sizes());
  const int64_t N = masks.size(0);
  TORCH_CHECK(N >= 1, "guard_head: masks must hold at least one head (N == 0 is not allowed)");
  TORCH_CHECK(
      N <= C,
      "guard_head: masks has N = ", N, " heads but weight has only C = ", C,
      " classes (head k is class k, so N <= C is required)");
  TORCH_CHECK(
      masks.size(1) == D,
      "guard_head: masks must be [N, D] with D = weight.size(1) = ", D, ", got shape ", masks.sizes());
  TORCH_CHECK(
      noise.dim() == 1 && noise.size(0) == D,
      "guard_head: noise must be 1-D [D] with D = weight.size(1) = ", D, ", got shape ", noise.sizes());
  TORCH_CHECK(
      thresholds.dim() == 1 && thresholds.size(0) == N,
      "guard_head: thresholds must be 1-D [N] with N = masks.size(0) = ", N, ", got shape ",
      thresholds.sizes());
  TORCH_CHECK(
      features.dim() == 2 || features.dim() == 3,
      "guard_head: features must be 2-D [B, D] or 3-D [B, N, D], got shape ", features.sizes());
  TORCH_CHECK(
      features.size(-1) == D,
      "guard_head: features last dim (", features.size(-1), ") must equal weight.size(1) = D = ", D);
  if (features.dim() == 3) {
    TORCH_CHECK(
        features.size(1) == N,
        "guard_head: 3-D features must be [B, N, D] with N = masks.size(0) = ", N, ", got shape ",
        features.sizes());
  }
}

void check_guard_head_features(const at::Tensor& features) {
  if (features.numel() > 0) {
    TORCH_CHECK(
        at::isfinite(features).all().item<bool>(), "guard_head: features contain NaN or Inf");
  }
}

void check_guard_head_params(const at::Tensor& masks, const at::Tensor& thresholds) {
  TORCH_CHECK(
      at::isfinite(thresholds).all().item<bool>(),
      "guard_head: thresholds contain NaN or Inf (must be finite)");
  TORCH_CHECK(
      at::logical_and(masks >= 0, masks <= 1).all().item<bool>(),
      "guard_head: masks must have all values in [0, 1] (and no NaN)");
}

GuardLogits guard_head_logits(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise) {
  const auto f32 = at::kFloat;
  const at::Tensor W = weight.to(f32);    // [C, D]
  const at::Tensor m = masks.to(f32);     // [N, D]
  const int64_t N = m.size(0);
  const int64_t C = W.size(0);
  const int64_t D = W.size(1);
  const int64_t B = features.size(0);
  const at::Tensor f = features.to(f32);

  // Fold the noise term: offset[k] = weight @ ((1 - masks[k]) * noise) + bias -> [N, C].
  const at::Tensor offset =
      at::addmm(bias.to(f32).unsqueeze(0), (1 - m) * noise.to(f32).unsqueeze(0), W.t());

  if (B <= C) {
    // Small batch: masking the features ([B, N, D]) is cheaper than folding the masks
    // into the weights ([N, C, D]); same FLOPs, ONE [B*N, D] x [D, C] GEMM.
    const at::Tensor x = (f.dim() == 2 ? f.unsqueeze(1) : f) * m.unsqueeze(0); // [B, N, D]
    at::Tensor logits = at::mm(x.reshape({B * N, D}), W.t()).view({B, N, C});
    logits.add_(offset.unsqueeze(0));
    return {logits, N * C, C};
  }

  // Fold the masks into the weights: Wk[k] = weight * masks[k]  -> [N, C, D].
  const at::Tensor Wk = W.unsqueeze(0) * m.unsqueeze(1);
  if (f.dim() == 2) {
    // All N heads in ONE [B, D] x [D, N*C] GEMM -> [B, N*C].
    at::Tensor logits = at::addmm(offset.reshape({1, N * C}), f, Wk.view({N * C, D}).t());
    return {logits.contiguous(), N * C, C};
  }
  // [B, N, D] features -> logits [N, B, C].
  if (f.device().is_cpu()) {
    // One GEMM per head on a strided view of the features (leading dimension N * D): the
    // batched GEMM first copies the transposed features, which cost as much as the math
    // (bench/: op vs reference, B = 256, N = C = 43, D = 512).
    at::Tensor logits = at::empty({N, B, C}, f.options());
    for (int64_t k = 0; k < N; ++k) {
      at::Tensor out = logits.select(0, k);
      at::addmm_out(out, offset.select(0, k).unsqueeze(0), f.select(1, k), Wk.select(0, k).t());
    }
    return {logits, C, B * C};
  }
  // CUDA: one batched GEMM over heads (one launch).
  at::Tensor logits = at::baddbmm(offset.unsqueeze(1), f.transpose(0, 1), Wk.transpose(1, 2));
  logits = logits.contiguous();
  return {logits, C, B * C};
}

namespace {

// Outputs are decisions (and confidences used only for decisions): the op is not
// differentiable. This Autograd kernel redispatches below autograd so outputs never
// carry a grad_fn even when e.g. weight is a trainable nn.Linear parameter.
GuardHeadResult guard_head_autograd(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise,
    const at::Tensor& thresholds) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("linkbreaker::guard_head", "")
                       .typed<GuardHeadResult(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(features, weight, bias, masks, noise, thresholds);
}

bool cuda_compiled() {
#ifdef LINKBREAKER_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t cuda_version() {
#ifdef LINKBREAKER_WITH_CUDA
  return cuda_compiled_version();
#else
  return -1;
#endif
}

} // namespace

TORCH_LIBRARY(linkbreaker, m) {
  m.def(
      "guard_head(Tensor features, Tensor weight, Tensor bias, Tensor masks, Tensor noise, "
      "Tensor thresholds) -> (Tensor conf, Tensor labels, Tensor verdict)");
  // Build introspection: whether this library holds CUDA kernels and with which CUDA
  // runtime version (CUDART_VERSION, e.g. 13000; -1 for a CPU-only build).
  m.def("cuda_compiled() -> bool", &cuda_compiled);
  m.def("cuda_version() -> int", &cuda_version);
}

TORCH_LIBRARY_IMPL(linkbreaker, Autograd, m) {
  m.impl("guard_head", &guard_head_autograd);
}

} // namespace linkbreaker
