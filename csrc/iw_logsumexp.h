// Input checks and the (max, sum) merge shared by the CPU and CUDA implementations of
// crmvae_fast::iw_lse_update (schema and formula in ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace crmvae_fast {

// Raises ValueError (TORCH_CHECK_VALUE) naming what was expected and what came. Shapes: log_px (n, k),
// z (n, k, D), mu_J and lv_J (n, D), run_max and run_sum (n,); one floating dtype
// (float32 or float64) and one device for all six.
inline void check_iw_lse_inputs(const at::Tensor& log_px, const at::Tensor& z, const at::Tensor& mu_J,
                                const at::Tensor& lv_J, const at::Tensor& run_max, const at::Tensor& run_sum,
                                c10::DeviceType expected_device) {
  TORCH_CHECK_VALUE(log_px.dim() == 2, "iw_lse_update: log_px must be (n, k), got ", log_px.dim(),
                    " dims with shape ", log_px.sizes());
  TORCH_CHECK_VALUE(z.dim() == 3, "iw_lse_update: z must be (n, k, D), got ", z.dim(), " dims with shape ", z.sizes());
  TORCH_CHECK_VALUE(mu_J.dim() == 2 && lv_J.dim() == 2, "iw_lse_update: mu_J and lv_J must be (n, D), got ",
                    mu_J.sizes(), " and ", lv_J.sizes());
  TORCH_CHECK_VALUE(run_max.dim() == 1 && run_sum.dim() == 1, "iw_lse_update: run_max and run_sum must be (n,), got ",
                    run_max.sizes(), " and ", run_sum.sizes());
  const int64_t n = z.size(0), k = z.size(1), D = z.size(2);
  TORCH_CHECK_VALUE(log_px.size(0) == n && log_px.size(1) == k, "iw_lse_update: log_px must be (n, k) = (", n, ", ",
                    k, ") to match z ", z.sizes(), ", got ", log_px.sizes());
  TORCH_CHECK_VALUE(mu_J.size(0) == n && mu_J.size(1) == D && lv_J.size(0) == n && lv_J.size(1) == D,
                    "iw_lse_update: mu_J and lv_J must be (n, D) = (", n, ", ", D, ") to match z ", z.sizes(),
                    ", got ", mu_J.sizes(), " and ", lv_J.sizes());
  TORCH_CHECK_VALUE(run_max.size(0) == n && run_sum.size(0) == n, "iw_lse_update: run_max and run_sum must be (n,) = (",
                    n, ",) to match z ", z.sizes(), ", got ", run_max.sizes(), " and ", run_sum.sizes(),
                    "; start them with iw_lse_init(n, device, dtype)");
  const auto dtype = z.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble,
                    "iw_lse_update: expected float32 or float64 tensors, got z of dtype ", dtype,
                    "; cast float16/bfloat16 inputs to float32 first");
  const at::Tensor* others[] = {&log_px, &mu_J, &lv_J, &run_max, &run_sum};
  const char* names[] = {"log_px", "mu_J", "lv_J", "run_max", "run_sum"};
  for (int t = 0; t < 5; ++t) {
    TORCH_CHECK_VALUE(others[t]->scalar_type() == dtype, "iw_lse_update: all inputs must share z's dtype ", dtype,
                      ", got ", names[t], " of dtype ", others[t]->scalar_type());
  }
  TORCH_CHECK_VALUE(z.device().type() == expected_device, "iw_lse_update: this implementation expects ",
                    expected_device, " tensors, got z on ", z.device());
  for (int t = 0; t < 5; ++t) {
    TORCH_CHECK_VALUE(others[t]->device() == z.device(), "iw_lse_update: all inputs must be on z's device ", z.device(),
                      ", got ", names[t], " on ", others[t]->device());
  }
}

// Merge two (max, sum of exp(x - max)) pairs. A pair with max = -inf holds no mass (its sum is 0); two such
// pairs merge to (-inf, 0) without computing exp(-inf - -inf) = NaN. A pair with max = +inf holds +inf mass
// (its sum counts its +inf terms, >= 1): the merge keeps max = +inf and adds up the counts, never computing
// exp(inf - inf) = NaN. A NaN on either side gives (NaN, NaN).
template <typename acc_t>
C10_HOST_DEVICE inline void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m != m || m2 != m2) {  // NaN (x != x), without <cmath>'s isnan, which differs between host and device
    m = m != m ? m : m2;
    s = m;
    return;
  }
  const acc_t mx = m > m2 ? m : m2;
  if (mx == -INFINITY) {
    s = s + s2;
    m = mx;
    return;
  }
  if (mx == INFINITY) {
    s = (m == mx ? s : static_cast<acc_t>(0)) + (m2 == mx ? s2 : static_cast<acc_t>(0));
    m = mx;
    return;
  }
  s = s * std::exp(m - mx) + s2 * std::exp(m2 - mx);
  m = mx;
}

}  // namespace crmvae_fast
