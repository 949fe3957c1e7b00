// LinkBreaker guard head: CPU kernel (ATen GEMM + fused at::parallel_for epilogue).
#include "../guard_head.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

namespace linkbreaker {

namespace {

// Per-row epilogue: N softmax confidences exp(z[b,k,k] - lse[b,k]), threshold test, vote,
// label. `lse` holds each head's log-sum-exp over classes, laid out like z's rows (ATen's
// vectorised exp: one scalar exp per head here instead of C). Returns whether some row's
// logits were non-finite.
bool guard_epilogue_cpu(
    const float* z,
    const float* lse,
    int64_t stride_b,
    int64_t stride_k,
    const float* thr,
    int64_t B,
    int64_t N,
    int64_t C,
    float* conf,
    int64_t* labels,
    int64_t* verdict) {
  const int64_t work_per_row = std::max<int64_t>(1, N * C);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* zb = z + b * stride_b;
      float* cb = conf + b * N;
      bool bad = false;
      int64_t count = 0;
      int64_t first = -1;
      float best = -1.0f;
      int64_t best_k = 0;
      for (int64_t k = 0; k < N && !bad; ++k) {
        const float* zk = zb + k * stride_k;
        for (int64_t c = 0; c < C; ++c) {
          if (!std::isfinite(zk[c])) {
            bad = true;
            break;
          }
        }
        if (bad) {
          break;
        }
        const float p = std::exp(zk[k] - lse[(b * stride_b + k * stride_k) / C]);
        cb[k] = p;
        if (p >= thr[k]) {
          if (count == 0) {
            first = k;
          }
          ++count;
        }
        if (p > best) { // strict: ties keep the smallest k (torch.argmax rule)
          best = p;
          best_k = k;
        }
      }
      if (bad) {
        std::fill(cb, cb + N, std::numeric_limits<float>::quiet_NaN());
        any_bad.store(true, std::memory_order_relaxed);
      }
      write_vote(bad, count, first, best_k, labels + b, verdict + b);
    }
  });
  return any_bad.load();
}

} // namespace

GuardHeadResult guard_head_cpu(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise,
    const at::Tensor& thresholds) {
  check_guard_head_inputs(features, weight, bias, masks, noise, thresholds);
  check_guard_head_params(masks, thresholds);

  const int64_t B = features.size(0);
  const int64_t N = masks.size(0);
  const int64_t C = weight.size(0);
  const auto opts = features.options();
  at::Tensor conf = at::empty({B, N}, opts.dtype(at::kFloat));
  at::Tensor labels = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor verdict = at::empty({B}, opts.dtype(at::kLong));
  if (B == 0) {
    return {conf, labels, verdict};
  }

  const GuardLogits lg = guard_head_logits(features, weight, bias, masks, noise);
  const at::Tensor thr = thresholds.to(at::kFloat).contiguous();
  const at::Tensor lse = at::logsumexp(lg.logits.view({-1, C}), 1); // one per (b, k) row
  const bool any_bad = guard_epilogue_cpu(
      lg.logits.data_ptr<float>(),
      lse.data_ptr<float>(),
      lg.stride_b,
      lg.stride_k,
      thr.data_ptr<float>(),
      B,
      N,
      C,
      conf.data_ptr<float>(),
      labels.data_ptr<int64_t>(),
      verdict.data_ptr<int64_t>());
  if (any_bad) {
    // Non-finite features are refused; finite ones whose logits overflow come back as
    // conf = NaN, label -1, verdict 2 (as on CUDA).
    check_guard_head_features(features);
  }
  return {conf, labels, verdict};
}

TORCH_LIBRARY_IMPL(linkbreaker, CPU, m) {
  m.impl("guard_head", &guard_head_cpu);
}

} // namespace linkbreaker
