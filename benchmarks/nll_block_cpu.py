"""CPU block size of ``compute_joint_nll``: time the batched NLL against MultiVae's per-point loop for a
784 + 10 feature model and three 32-feature modalities, single thread, for several decode-block sizes.

    python benchmarks/nll_block_cpu.py [--n 64] [--K 1000] [--rows 100,200,400,800,1600,4096]

Prints seconds (best of ``--repeat``) per provider and block; ``auto`` is the size ``CRMVAE`` picks (by the
bytes of the widest decoder output, ``model.NLL_CPU_BLOCK_BYTES``). Run on an idle machine: shared cores make
single runs noisy.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's crmvae_fast, not an installed one


def models(dims, latent):
    import crmvae_fast as cf
    from multivae.models import CRMVAE as MVCRMVAE
    from multivae.models import CRMVAEConfig as MVConfig

    kw = dict(n_modalities=len(dims), latent_dim=latent, input_dims=dims)
    torch.manual_seed(0)
    mv = MVCRMVAE(MVConfig(**copy.deepcopy(kw)))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**copy.deepcopy(kw)), fast_kernels=True)
    ours.load_state_dict(mv.state_dict())
    return mv, ours


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--K", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rows", default="100,200,400,800,1600,4096")
    ap.add_argument("--no-multivae", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from multivae.data.datasets.base import MultimodalBaseDataset

    import crmvae_fast.model as model_mod

    for label, dims, latent in (("784+10", {"img": (784,), "lbl": (10,)}, 10),
                                ("3x32", {f"m{i}": (32,) for i in range(3)}, 8)):
        mv, ours = models(dims, latent)
        g = torch.Generator().manual_seed(1)
        data = {m: torch.rand(args.n, *d, generator=g) for m, d in dims.items()}
        ds = MultimodalBaseDataset(data)
        row = {}
        if not args.no_multivae:
            row["multivae"], ref = best(lambda: mv.compute_joint_nll(ds, K=args.K, batch_size_K=100), args.repeat)
        saved = model_mod.NLL_MAX_ROWS_CPU
        for rows in ["auto"] + [int(r) for r in args.rows.split(",")]:
            if rows != "auto":
                model_mod.NLL_MAX_ROWS_CPU = rows
                model_mod.NLL_CPU_BLOCK_BYTES = None  # a fixed row count
            row[f"fused rows={rows}"], _ = best(lambda: ours.compute_joint_nll(ds, K=args.K, batch_size_K=100),
                                                args.repeat)
            model_mod.NLL_MAX_ROWS_CPU = saved
            model_mod.NLL_CPU_BLOCK_BYTES = _AUTO
        print(f"{label}: n={args.n} K={args.K}, 1 thread, {torch.__version__}")
        for k, v in row.items():
            extra = f"  ({row['multivae'] / v:.2f}x multivae)" if "multivae" in row and k != "multivae" else ""
            print(f"  {k:22s} {v:7.3f} s{extra}")


if __name__ == "__main__":
    import crmvae_fast.model as _m

    _AUTO = getattr(_m, "NLL_CPU_BLOCK_BYTES", None)
    main()
