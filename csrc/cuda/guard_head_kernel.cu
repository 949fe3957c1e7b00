// LinkBreaker guard head: CUDA kernel (cuBLAS GEMM via ATen + ONE fused epilogue launch).
//
// Epilogue: one block per input row b; each warp owns heads k = warp, warp + nwarps, ...
// and computes the max-subtracted softmax confidence of class k over the C logits of
// head k with warp-shuffle reductions (coalesced over c). The per-warp vote state
// (credible count, first credible head, argmax) is combined through shared memory.
// No host synchronisation: value checks (NaN/Inf features, thresholds, mask range)
// are done by the Python wrapper linkbreaker_ext.ops.guard_head; rows whose logits are
// not all finite get conf = NaN, label = -1, verdict = 2 (never silent garbage).
#include "../guard_head.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

namespace linkbreaker {

namespace {

constexpr int kMaxWarps = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, o);
  }
  return v;
}

__global__ void guard_epilogue_kernel(
    const float* __restrict__ z,
    int64_t stride_b,
    int64_t stride_k,
    const float* __restrict__ thr,
    int64_t N,
    int64_t C,
    float* __restrict__ conf,
    int64_t* __restrict__ labels,
    int64_t* __restrict__ verdict) {
  __shared__ int s_count[kMaxWarps];
  __shared__ int64_t s_first[kMaxWarps];
  __shared__ float s_best[kMaxWarps];
  __shared__ int64_t s_best_k[kMaxWarps];
  __shared__ int s_bad[kMaxWarps];
  __shared__ int s_row_bad;

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const float* zb = z + b * stride_b;
  float* cb = conf + b * N;

  int count = 0;
  int64_t first = N; // smallest credible head seen by this warp
  float best = -1.0f;
  int64_t best_k = N;
  int bad = 0;

  for (int64_t k = warp; k < N; k += nwarps) {
    const float* zk = zb + k * stride_k;
    float m = -INFINITY;
    int finite = 1;
    for (int64_t c = lane; c < C; c += 32) {
      const float v = zk[c];
      finite &= isfinite(v) ? 1 : 0;
      m = fmaxf(m, v);
    }
    m = warp_max(m);
    finite = __all_sync(kFullMask, finite);
    float s = 0.0f;
    for (int64_t c = lane; c < C; c += 32) {
      s += expf(zk[c] - m);
    }
    s = warp_sum(s);
    const float p = expf(zk[k] - m) / s;
    if (lane == 0) {
      cb[k] = p;
    }
    if (!finite) {
      bad = 1;
    } else {
      if (p >= thr[k]) {
        if (count == 0) {
          first = k; // k increases within a warp, so the first hit is the smallest
        }
        ++count;
      }
      if (p > best) { // strict: ties keep the smallest k within this warp
        best = p;
        best_k = k;
      }
    }
  }

  if (lane == 0) {
    s_count[warp] = count;
    s_first[warp] = first;
    s_best[warp] = best;
    s_best_k[warp] = best_k;
    s_bad[warp] = bad;
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    int total = 0;
    int64_t first_all = N;
    float best_all = -1.0f;
    int64_t best_k_all = N;
    int any_bad = 0;
    for (int w = 0; w < nwarps; ++w) {
      total += s_count[w];
      first_all = s_first[w] < first_all ? s_first[w] : first_all;
      any_bad |= s_bad[w];
      if (s_best[w] > best_all || (s_best[w] == best_all && s_best_k[w] < best_k_all)) {
        best_all = s_best[w];
        best_k_all = s_best_k[w];
      }
    }
    s_row_bad = any_bad;
    write_vote(any_bad != 0, total, first_all, best_k_all, labels + b, verdict + b);
  }
  __syncthreads();
  if (s_row_bad) {
    for (int64_t k = threadIdx.x; k < N; k += blockDim.x) {
      cb[k] = NAN;
    }
  }
}

GuardHeadResult guard_head_cuda(
    const at::Tensor& features,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& masks,
    const at::Tensor& noise,
    const at::Tensor& thresholds) {
  check_guard_head_inputs(features, weight, bias, masks, noise, thresholds);
  const c10::cuda::CUDAGuard device_guard(features.device());

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
  TORCH_CHECK(B <= 2147483647LL, "guard_head: features batch size B = ", B, " is too large for CUDA");

  const GuardLogits lg = guard_head_logits(features, weight, bias, masks, noise);
  const at::Tensor thr = thresholds.to(at::kFloat).contiguous();

  const int warps = static_cast<int>(N < kMaxWarps ? N : kMaxWarps);
  const dim3 grid(static_cast<unsigned>(B));
  const dim3 block(static_cast<unsigned>(warps * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  guard_epilogue_kernel<<<grid, block, 0, stream>>>(
      lg.logits.data_ptr<float>(),
      lg.stride_b,
      lg.stride_k,
      thr.data_ptr<float>(),
      N,
      C,
      conf.data_ptr<float>(),
      labels.data_ptr<int64_t>(),
      verdict.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {conf, labels, verdict};
}

} // namespace

int64_t cuda_compiled_version() {
  return static_cast<int64_t>(CUDART_VERSION);
}

TORCH_LIBRARY_IMPL(linkbreaker, CUDA, m) {
  m.impl("guard_head", &guard_head_cuda);
}

} // namespace linkbreaker
