"""The CPU decode block of ``compute_joint_nll`` is sized by the bytes of the widest decoder output, and the
answer does not depend on the block."""

import torch

import crmvae_fast as cf
from crmvae_fast import model as model_mod


def test_block_rows_follow_the_widest_output():
    wide = {"img": torch.zeros(3, 784), "lbl": torch.zeros(3, 10)}
    narrow = {f"m{i}": torch.zeros(3, 32) for i in range(3)}
    assert model_mod._cpu_block_rows(wide) == model_mod.NLL_CPU_BLOCK_BYTES // (784 * 4)
    assert model_mod._cpu_block_rows(narrow) == model_mod.NLL_MAX_ROWS_CPU  # small rows: the row cap
    assert model_mod._cpu_block_rows({"x": torch.zeros(2, 3, 1000, 1000)}) == 1


def test_answer_does_not_depend_on_the_block():
    torch.manual_seed(0)
    dims = {"img": (40,), "lbl": (3,)}
    model = cf.CRMVAE(cf.CRMVAEConfig(n_modalities=2, latent_dim=3, input_dims=dims,
                                      decoders_dist={"img": "bernoulli", "lbl": "laplace"}), fast_kernels=True)
    g = torch.Generator().manual_seed(1)
    data = {"img": torch.rand(5, 40, generator=g).round(), "lbl": torch.randn(5, 3, generator=g)}
    d, masks = cf.inputs.read_inputs({"data": data}, model.modalities_name)
    mu, lv = model._encode_experts(d, model.modalities_name)
    mu_J, lv_J = cf.reference.poe(mu, lv)
    K = 12
    eps = torch.randn(K, 5, 3, generator=g)
    noise = lambda k0, k1, i0, i1: eps[k0:k1, i0:i1]  # noqa: E731
    with torch.no_grad():
        ref = model._joint_ll_batched(d, masks, mu_J, lv_J, K, 5, noise=noise)  # default (byte-sized) block
        for rows in (5, 11, 64):
            got = model._joint_ll_batched(d, masks, mu_J, lv_J, K, 5, noise=noise, max_rows=rows)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
