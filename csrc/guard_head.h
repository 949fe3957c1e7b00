// LinkBreaker guard head: shared declarations for the CPU and CUDA kernels.
//
// Op contract (registered once in guard_head.cpp):
//   linkbreaker::guard_head(Tensor features, Tensor weight, Tensor bias,
//                           Tensor masks, Tensor noise, Tensor thresholds)
//       -> (Tensor conf, Tensor labels, Tensor verdict)
//
//   features [B, D] or [B, N, D]; weight [C, D]; bias [C]; masks [N, D] in [0,1];
//   noise [D]; thresholds [N]; N <= C; head k is class k.
//   z[b,k,:]   = weight @ (masks[k] * f[b,k] + (1 - masks[k]) * noise) + bias
//   conf[b,k]  = softmax(z[b,k,:])[k]                       (float32 [B, N])
//   credible   = conf[b,k] >= thresholds[k]
//   verdict[b] = 0 exactly one credible head, 1 two or more, 2 none   (int64 [B])
//   labels[b]  = credible class (verdict 0), -1 (verdict 1),
//                argmax_k conf[b,k] with ties -> smallest k (verdict 2) (int64 [B])
//   Rows whose logits are not all finite: conf = NaN, label = -1, verdict = 2.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace linkbreaker {

using GuardHeadResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Verdict codes.
constexpr int64_t kVerdictAccept = 0;
constexpr int64_t kVerdictAlarm = 1;
constexpr int64_t kVerdictOOD = 2;

#if defined(__CUDACC__)
#define LINKBREAKER_HOST_DEVICE __host__ __device__
#else
#define LINKBREAKER_HOST_DEVICE
#endif

// The one-label rule, shared by the CPU and CUDA kernels: `count` credible heads, the smallest
// credible head `first`, the most confident head `best_k`, `bad` when the row's logits are not finite.
LINKBREAKER_HOST_DEVICE inline void write_vote(
    bool bad, int64_t count, int64_t first, int64_t best_k, int64_t* label, int64_t* verdict) {
  if (bad) {
    *label = -1;
    *verdict = kVerdictOOD;
  } else if (count == 1) {
    *label = first;
    *verdict = kVerdictAccept;
  } else if (count >= 2) {
    *label = -1;
    *verdict = kVerdictAlarm;
  } else {
    *label = best_k;
    *verdict = kVerdictOOD;
  }
}

// Shape / dtype / device validation shared by every backend (no host sync).
void check_guard_head_inputs(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise,
    const at::Tensor& thresholds);

// Value checks (non-finite thresholds, masks outside [0, 1]; NaN/Inf features).
// These need a reduction + host read, so only the CPU kernel calls them (the small
// parameters eagerly, the features only when some row's logits came out non-finite: a
// NaN or Inf feature always makes its row's logits non-finite, so the clean path never
// scans the [B, N, D] features); on CUDA the Python wrapper linkbreaker_ext.ops.guard_head
// performs them.
void check_guard_head_params(const at::Tensor& masks, const at::Tensor& thresholds);
void check_guard_head_features(const at::Tensor& features);

// All head logits in float32: for B > C the masks are folded into the weights
// (Wk = weight * masks[k], [N, C, D]) and the noise term into a per-head offset
// (weight @ ((1 - masks[k]) * noise) + bias, [N, C]); for B <= C the (cheaper) masked
// features [B, N, D] are multiplied by weight^T instead. Same FLOPs either way. One GEMM,
// except for [B, N, D] features with B > C on CPU: one GEMM per head on strided views
// (a batched GEMM there first copies the transposed features).
// Returns a tensor `logits` plus the strides (in elements) such that
//   z[b, k, c] = logits.data_ptr<float>()[b * stride_b + k * stride_k + c]
struct GuardLogits {
  at::Tensor logits;
  int64_t stride_b;
  int64_t stride_k;
};

GuardLogits guard_head_logits(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise);

// Backend entry points (registered with TORCH_LIBRARY_IMPL in their own files).
GuardHeadResult guard_head_cpu(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise,
    const at::Tensor& thresholds);

#ifdef LINKBREAKER_WITH_CUDA
// CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000).
int64_t cuda_compiled_version();
#endif

} // namespace linkbreaker
