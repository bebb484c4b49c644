// The schema of the crmvae_fast C++/CUDA ops, declared once.
//
// crmvae_fast::iw_lse_update folds one chunk of k importance samples into a running log-sum-exp:
//   log w_ik = log_px[i,k] + log N(z_ik; 0, I) - log N(z_ik; mu_J[i], exp(lv_J[i]))
//            = log_px[i,k] - 0.5 sum_d z^2 + 0.5 sum_d (lv_J + (z - mu_J)^2 exp(-lv_J))
//   new_max[i] = max(run_max[i], max_k log w_ik)
//   new_sum[i] = run_sum[i] exp(run_max[i] - new_max[i]) + sum_k exp(log w_ik - new_max[i])
// Eager twin: crmvae_fast.reference.importance_log_weights + iw_logsumexp, and the torch version of the merge
// in crmvae_fast/kernels/iw_logsumexp.py. Implementations: iw_logsumexp_cpu.cpp (CPU), iw_logsumexp_cuda.cu
// (CUDA). The fake (meta) function is registered from Python.

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(crmvae_fast, m) {
  m.def(
      "iw_lse_update(Tensor log_px, Tensor z, Tensor mu_J, Tensor lv_J, Tensor run_max, Tensor run_sum)"
      " -> (Tensor, Tensor)");
}

// Importing the built library as the Python module crmvae_fast._C runs the registrations above (and the
// TORCH_LIBRARY_IMPL blocks of the other files); the module itself holds nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "crmvae_fast C++/CUDA ops: importing registers them under torch.ops.crmvae_fast";
}
