// CPU implementation of crmvae_fast::iw_lse_update (schema and formula in ops.cpp, eager twin in
// crmvae_fast/reference.py). Arithmetic in double for float32 and float64 inputs; the outputs come back in the
// input dtype. Data points are split across threads with at::parallel_for; for each point the chunk's k
// log-weights go to a k-long scratch buffer (never K-long), then one max pass and one exp-sum pass.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "iw_logsumexp.h"

namespace crmvae_fast {
namespace {

template <typename scalar_t>
void iw_lse_update_cpu_kernel(const scalar_t* __restrict__ log_px, const scalar_t* __restrict__ z,
                              const scalar_t* __restrict__ mu_J, const scalar_t* __restrict__ lv_J,
                              const scalar_t* __restrict__ run_max, const scalar_t* __restrict__ run_sum,
                              scalar_t* __restrict__ out_max, scalar_t* __restrict__ out_sum, int64_t n, int64_t k,
                              int64_t D) {
  // One point costs about k * D multiply-adds; aim for a few thousand per task.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, k * D));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> inv_var(D), mu(D), lw(k);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* mu_i = mu_J + i * D;
      const scalar_t* lv_i = lv_J + i * D;
      double half_sum_lv = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        inv_var[d] = std::exp(-static_cast<double>(lv_i[d]));
        mu[d] = static_cast<double>(mu_i[d]);
        half_sum_lv += static_cast<double>(lv_i[d]);
      }
      half_sum_lv *= 0.5;
      const double* iv = inv_var.data();
      const double* m = mu.data();

      double chunk_max = -INFINITY;
      for (int64_t s = 0; s < k; ++s) {
        const scalar_t* z_is = z + (i * k + s) * D;
        double acc = 0.0;  // sum_d (z - mu)^2 / var - z^2
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) {
          const double zd = static_cast<double>(z_is[d]);
          const double t = zd - m[d];
          acc += t * t * iv[d] - zd * zd;
        }
        const double w = static_cast<double>(log_px[i * k + s]) + 0.5 * acc + half_sum_lv;
        lw[s] = w;
        // NaN-propagating max: a NaN log-weight makes the result NaN, never silently dropped.
        chunk_max = (w > chunk_max || std::isnan(w)) ? w : chunk_max;
      }

      double mx = static_cast<double>(run_max[i]);
      double sm = static_cast<double>(run_sum[i]);
      if (chunk_max != -INFINITY) {  // a chunk of -inf weights adds no mass (and would give exp(-inf + inf))
        double chunk_sum = 0.0;
        if (chunk_max == INFINITY) {  // +inf mass: count the +inf weights rather than compute exp(inf - inf)
          for (int64_t s = 0; s < k; ++s) chunk_sum += lw[s] == INFINITY ? 1.0 : 0.0;
        } else {
          for (int64_t s = 0; s < k; ++s) chunk_sum += std::exp(lw[s] - chunk_max);
        }
        lse_merge<double>(mx, sm, chunk_max, chunk_sum);
      }
      out_max[i] = static_cast<scalar_t>(mx);
      out_sum[i] = static_cast<scalar_t>(sm);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> iw_lse_update_cpu(const at::Tensor& log_px_in, const at::Tensor& z_in,
                                                     const at::Tensor& mu_J_in, const at::Tensor& lv_J_in,
                                                     const at::Tensor& run_max_in, const at::Tensor& run_sum_in) {
  check_iw_lse_inputs(log_px_in, z_in, mu_J_in, lv_J_in, run_max_in, run_sum_in, c10::DeviceType::CPU);
  const at::Tensor log_px = log_px_in.contiguous(), z = z_in.contiguous(), mu_J = mu_J_in.contiguous(),
                   lv_J = lv_J_in.contiguous(), run_max = run_max_in.contiguous(),
                   run_sum = run_sum_in.contiguous();
  const int64_t n = z.size(0), k = z.size(1), D = z.size(2);
  at::Tensor out_max = at::empty_like(run_max);
  at::Tensor out_sum = at::empty_like(run_sum);
  if (n == 0) return {out_max, out_sum};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "iw_lse_update_cpu", [&] {
    iw_lse_update_cpu_kernel<scalar_t>(log_px.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                       mu_J.data_ptr<scalar_t>(), lv_J.data_ptr<scalar_t>(),
                                       run_max.data_ptr<scalar_t>(), run_sum.data_ptr<scalar_t>(),
                                       out_max.data_ptr<scalar_t>(), out_sum.data_ptr<scalar_t>(), n, k, D);
  });
  return {out_max, out_sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(crmvae_fast, CPU, m) { m.impl("iw_lse_update", &iw_lse_update_cpu); }

}  // namespace crmvae_fast
