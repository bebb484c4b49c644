"""The fused ops' implementations, one module per op: kernels, launchers, custom op (fake + autograd) and the
public function side by side. Import the public functions from :mod:`crmvae_fast.ops`; the eager twins live in
:mod:`crmvae_fast.reference`."""
