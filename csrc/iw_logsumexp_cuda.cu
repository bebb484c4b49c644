// CUDA implementation of crmvae_fast::iw_lse_update (schema and formula in ops.cpp, eager twin in
// crmvae_fast/reference.py, CPU twin in iw_logsumexp_cpu.cpp).
//
// One block per data point, one warp per sample: the lanes of a warp read the sample's D latents (coalesced),
// each adds its share of (z - mu)^2 exp(-lv) - z^2 + lv, and a butterfly shuffle gives every lane the sum. Each
// warp folds its samples into its own (max, sum of exp) pair; thread 0 then merges the warps' pairs into the
// running pair. Arithmetic in the accumulate type of the input: float for float32, double for float64.

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "iw_logsumexp.h"

namespace crmvae_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;  // warps per block: samples of one point are spread over them
constexpr int kThreads = kWarps * kWarpSize;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    iw_lse_update_kernel(const scalar_t* __restrict__ log_px, const scalar_t* __restrict__ z,
                         const scalar_t* __restrict__ mu_J, const scalar_t* __restrict__ lv_J,
                         const scalar_t* __restrict__ run_max, const scalar_t* __restrict__ run_sum,
                         scalar_t* __restrict__ out_max, scalar_t* __restrict__ out_sum, int64_t k, int64_t D) {
  __shared__ acc_t warp_max[kWarps];
  __shared__ acc_t warp_sum[kWarps];
  const int64_t i = static_cast<int64_t>(blockIdx.x);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const scalar_t* mu_i = mu_J + i * D;
  const scalar_t* lv_i = lv_J + i * D;

  acc_t m = -INFINITY;  // this warp's (max, sum of exp(w - max)); the same in every lane
  acc_t s = 0;
  for (int64_t smp = warp; smp < k; smp += kWarps) {
    const scalar_t* z_is = z + (i * k + smp) * D;
    acc_t acc = 0;  // sum_d (z - mu)^2 / var - z^2 + lv
    for (int64_t d = lane; d < D; d += kWarpSize) {
      const acc_t zd = static_cast<acc_t>(z_is[d]);
      const acc_t lv = static_cast<acc_t>(lv_i[d]);
      const acc_t t = zd - static_cast<acc_t>(mu_i[d]);
      acc += t * t * std::exp(-lv) - zd * zd + lv;
    }
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    const acc_t w = static_cast<acc_t>(log_px[i * k + smp]) + static_cast<acc_t>(0.5) * acc;
    if (w != -INFINITY) lse_merge<acc_t>(m, s, w, static_cast<acc_t>(1));  // a -inf weight adds no mass
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t mx = static_cast<acc_t>(run_max[i]);
    acc_t sm = static_cast<acc_t>(run_sum[i]);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) lse_merge<acc_t>(mx, sm, warp_max[w], warp_sum[w]);
    out_max[i] = static_cast<scalar_t>(mx);
    out_sum[i] = static_cast<scalar_t>(sm);
  }
}

std::tuple<at::Tensor, at::Tensor> iw_lse_update_cuda(const at::Tensor& log_px_in, const at::Tensor& z_in,
                                                      const at::Tensor& mu_J_in, const at::Tensor& lv_J_in,
                                                      const at::Tensor& run_max_in, const at::Tensor& run_sum_in) {
  check_iw_lse_inputs(log_px_in, z_in, mu_J_in, lv_J_in, run_max_in, run_sum_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor log_px = log_px_in.contiguous(), z = z_in.contiguous(), mu_J = mu_J_in.contiguous(),
                   lv_J = lv_J_in.contiguous(), run_max = run_max_in.contiguous(),
                   run_sum = run_sum_in.contiguous();
  const int64_t n = z.size(0), k = z.size(1), D = z.size(2);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "iw_lse_update: at most 2^31 - 1 data points per call, got ",
              n, "; split the points into batches");
  at::Tensor out_max = at::empty_like(run_max);
  at::Tensor out_sum = at::empty_like(run_sum);
  if (n == 0) return {out_max, out_sum};
  // torch's current stream (what at::cuda::getCurrentCUDAStream returns; the c10 header avoids pulling
  // cuBLAS/cuSPARSE headers into the build).
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "iw_lse_update_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    iw_lse_update_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(
        log_px.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), mu_J.data_ptr<scalar_t>(), lv_J.data_ptr<scalar_t>(),
        run_max.data_ptr<scalar_t>(), run_sum.data_ptr<scalar_t>(), out_max.data_ptr<scalar_t>(),
        out_sum.data_ptr<scalar_t>(), k, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_max, out_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(crmvae_fast, CUDA, m) { m.impl("iw_lse_update", &iw_lse_update_cuda); }

}  // namespace crmvae_fast
