// LinkBreaker guard head: CPU kernel (ATen GEMM + fused at::parallel_for epilogue).
#include "../guard_head.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace linkbreaker {

namespace {

// Per-row epilogue: N max-subtracted softmax confidences, threshold test, vote, label.
void guard_epilogue_cpu(
    const float* z,
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
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < C; ++c) {
          const float v = zk[c];
          if (!std::isfinite(v)) {
            bad = true;
            break;
          }
          m = std::max(m, v);
        }
        if (bad) {
          break;
        }
        float s = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
          s += std::exp(zk[c] - m);
        }
        const float p = std::exp(zk[k] - m) / s;
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
      }
      write_vote(bad, count, first, best_k, labels + b, verdict + b);
    }
  });
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
  check_guard_head_values(features, masks, thresholds);

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
  guard_epilogue_cpu(
      lg.logits.data_ptr<float>(),
      lg.stride_b,
      lg.stride_k,
      thr.data_ptr<float>(),
      B,
      N,
      C,
      conf.data_ptr<float>(),
      labels.data_ptr<int64_t>(),
      verdict.data_ptr<int64_t>());
  return {conf, labels, verdict};
}

TORCH_LIBRARY_IMPL(linkbreaker, CPU, m) {
  m.impl("guard_head", &guard_head_cpu);
}

} // namespace linkbreaker
