"""The ``crmvae-fast`` command (also ``python -m crmvae_fast``).

* ``crmvae-fast info``: which fast paths are live here (:func:`crmvae_fast.backend_info`), as a table.
* ``crmvae-fast bench [--quick] [--json PATH] [--plot PATH] [--ops ...]``: the benchmark suite
  (:mod:`crmvae_fast.bench`) on whatever device is present: a table of times and speed-ups, JSON rows appended
  to one file (default ``./crmvae_fast_bench/results.jsonl``), a PNG plot. ``--ops`` takes the benchmarked ops
  of :data:`crmvae_fast.bench.SPECS`.
* ``crmvae-fast train [--epochs N] [--fast-kernels/--no-fast-kernels] [--out DIR] ...``: trains CRMVAE (default
  MLP architectures) with Adam on the embedded synthetic dataset (:mod:`crmvae_fast.synthetic`), reports the
  per-epoch loss and samples per second, the held-out joint NLL, and saves the model in MultiVae's folder format.
  Under ``torchrun --nproc_per_node=N -m crmvae_fast train ...`` it trains one model with DDP over N processes
  (:mod:`crmvae_fast.distributed`): each rank sees 1/N of every epoch, rank 0 prints and saves.
* ``crmvae-fast evaluate [--model DIR] [--data PATH] [--K 1000] [--cond-mod A --gen-mod B]``: the joint (or
  conditional) NLL of a saved model summed over a dataset; under torchrun each process takes its share.
* ``crmvae-fast kernels [--M 5 --B 4096 --D 512 --dtype float32]``: a static report on the latent step's Triton
  kernels from their sm_90 cubin, no GPU needed (:mod:`crmvae_fast.kernel_report`): registers, spills,
  occupancy, SASS warp-instructions per element and the modelled issue time against memory time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional


# ------------------------------------------------------------------------------------------------------ info
def _flatten(d: dict, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if not v:
                out.append((key, "-"))
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def cmd_info(args) -> int:
    from . import backend_info

    info = backend_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    rows = _flatten(info)
    width = max(len(k) for k, _ in rows)
    print("crmvae_fast backends")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {'None' if v is None else v}")
    return 0


# ----------------------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    if args.readme:  # the README's results table (crmvae_fast/bench/readme.py)
        from .bench.readme import main as readme_table

        return readme_table(args.readme, args.device, smoke=args.smoke)
    import torch

    from . import bench

    device = torch.device(args.device) if args.device else bench.default_device()
    ops = args.ops.split(",") if args.ops else list(bench.OPS)
    providers = args.providers.split(",") if args.providers else list(bench.PROVIDERS)
    for p in providers:
        if p not in bench.PROVIDERS:
            print(f"error: unknown provider {p!r}; expected some of {','.join(bench.PROVIDERS)}", file=sys.stderr)
            return 2
    for o in ops:
        if o not in bench.OPS:
            print(f"error: unknown op {o!r}; expected some of {','.join(bench.OPS)}", file=sys.stderr)
            return 2
    kind = "smoke (tiny sizes, numbers mean nothing)" if args.smoke else ("quick" if args.quick else "full")
    print(f"crmvae-fast bench: {kind} suite on {bench.device_name(device)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type == "cpu":
        print("note: TRITON_INTERPRET=1, the fused provider runs the Triton interpreter: its times mean nothing")
    t0 = time.perf_counter()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    path = args.json or bench.default_results_path()
    partial = path + ".partial"  # rows saved as they come: a run killed half-way leaves them here
    if os.path.exists(partial):
        os.remove(partial)
    rows = bench.run_suite(device, quick=args.quick, smoke=args.smoke, ops=ops, providers=providers,
                           dtype=args.dtype, budget_s=args.budget_s, log=log,
                           on_row=lambda r: bench.append_rows([r], partial))
    elapsed = time.perf_counter() - t0
    print()
    print(bench.format_table(rows))
    bench.append_rows(rows, path)
    if os.path.exists(partial):
        os.remove(partial)
    print(f"\n{len(rows)} rows appended to {path} ({elapsed:.1f} s)")
    if not args.no_plot:
        plot_path = args.plot or os.path.join(os.path.dirname(os.path.abspath(path)), "speedup.png")
        why = bench.plot(rows, plot_path)
        print(f"plot: {why}" if why else f"plot written to {plot_path}")
    return 0


# ----------------------------------------------------------------------------------------------------- train
class _Progress:
    """tqdm when it is installed, else a line every ~10 % of the epoch. ``update(loss)`` takes a callable
    giving the batch's loss per sample; it is read (a device sync) only every ~10 % of the epoch."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n, self.enabled = total, desc, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
            except Exception:
                self.bar = None
        self.every = max(1, total // 10)

    def update(self, loss) -> None:
        self.n += 1
        if not self.enabled:
            return
        show = self.n % self.every == 0 or self.n == self.total
        if self.bar is not None:
            if show:
                self.bar.set_postfix(loss=f"{loss():.4g}", refresh=False)
            self.bar.update(1)
        elif show:
            print(f"  {self.desc}: {self.n}/{self.total} batches, loss/sample {loss():.4g}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_train(args) -> int:
    import torch

    from . import CRMVAE, CRMVAEConfig, distributed, evaluate_joint_nll, synthetic

    if args.epochs < 0 or args.n_train < 1 or args.n_test < 1 or args.batch_size < 1:
        print("error: --epochs must be >= 0 and --n-train, --n-test, --batch-size >= 1", file=sys.stderr)
        return 2
    # Under torchrun: one process group (NCCL on GPUs, gloo on CPUs), GPU LOCAL_RANK per rank; else one process.
    ctx = distributed.init_from_env(args.device)
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    say = print if ctx.is_main else (lambda *a, **k: None)  # only rank 0 prints
    torch.manual_seed(args.seed)
    train = synthetic.make_dataset(args.n_train, seed=args.seed, missing_rate=args.missing_rate)
    test = synthetic.make_dataset(args.n_test, seed=args.seed + 1, missing_rate=0.0)
    config = CRMVAEConfig(**synthetic.model_config_kwargs(latent_dim=args.latent_dim), beta=args.beta)
    model = CRMVAE(config, fast_kernels=args.fast_kernels).to(device)
    net = distributed.wrap_ddp(model, device) if world > 1 else model  # gradients summed over ranks
    step_model, adam = net, {}
    if args.compile:  # the whole forward + backward as compiled graphs (CUDA graphs on a GPU), fused Adam
        step_model = torch.compile(net, mode="reduce-overhead", fullgraph=True, dynamic=False)
        adam = {"fused": True}
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, **adam)
    if world > 1:
        torch.manual_seed(args.seed + rank)  # per-rank noise; the same initial weights on every rank
    per_rank = -(-args.n_train // world)
    n_batches = -(-per_rank // args.batch_size)
    say(f"crmvae-fast train: {world} process{'es' if world > 1 else ''}"
        + (f" (torchrun, DistributedDataParallel over {ctx.backend}, {per_rank} samples and batches of "
           f"{args.batch_size} per rank per epoch)" if world > 1 else " (no process group)"), flush=True)
    say(f"crmvae-fast train: {args.n_train} train / {args.n_test} test samples of modalities "
        f"{ {m: s for m, s in synthetic.INPUT_DIMS.items()} } ({100 * args.missing_rate:.0f}% of modalities "
        f"missing), latent {args.latent_dim}, fast_kernels={args.fast_kernels}, device {device}"
        + (", torch.compile(mode='reduce-overhead') + fused Adam" if args.compile else ""))
    for epoch in range(1, args.epochs + 1):
        net.train()
        bar = _Progress(n_batches, f"epoch {epoch}/{args.epochs}", enabled=not args.quiet and ctx.is_main)
        total, seen = 0.0, 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for batch in distributed.shard_batches(train, args.batch_size, rank, world, shuffle=True,
                                               seed=args.seed * 1000 + epoch):
            batch = synthetic.to_device(batch, device)
            opt.zero_grad(set_to_none=True)
            if args.compile:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
            out = step_model(batch)
            out["loss"].backward()
            opt.step()
            b = len(batch["labels"])
            total = total + out["loss"].detach()  # summed on the device: no sync per batch
            seen += b
            bar.update(lambda: float(out["loss"].detach()) / b)
        if world > 1:  # the epoch's loss and samples over all ranks
            sums = distributed.all_reduce_sum(torch.stack([torch.as_tensor(total, device=device).double(),
                                                           torch.tensor(float(seen), device=device).double()]))
            total, seen = sums[0], int(sums[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        bar.close()
        say(f"epoch {epoch}/{args.epochs}: loss/sample {float(total) / seen:.4f}, {seen / dt:.0f} samples/s "
            f"({dt:.2f} s)", flush=True)

    t0 = time.perf_counter()
    # each rank evaluates its block of the test set, the sum is all-reduced
    nll = evaluate_joint_nll(model, test, K=args.nll_k, batch_size_K=min(100, args.nll_k),
                             batch_size=max(1, args.n_test), progress=False)
    say(f"held-out joint NLL (K={args.nll_k}): {nll / args.n_test:.4f} per sample "
        f"({nll:.2f} summed over {args.n_test}; {time.perf_counter() - t0:.2f} s)")
    if ctx.is_main:  # only rank 0 saves
        model.save(args.out)
    say(f"model saved to {args.out} (MultiVae folder format: CRMVAE.load_from_folder({args.out!r}))")
    distributed.shutdown(ctx)
    return 0


# -------------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    import torch

    from . import CRMVAE, distributed, evaluate_cond_nll, evaluate_joint_nll, synthetic

    if args.k < 1 or args.batch_size_k < 1 or args.batch_size < 1 or args.n_test < 1:
        print("error: --K, --batch-size-K, --batch-size and --n-test must be >= 1", file=sys.stderr)
        return 2
    if (args.cond_mod is None) != (args.gen_mod is None):
        print("error: give both --cond-mod and --gen-mod (conditional NLL), or neither (joint NLL)", file=sys.stderr)
        return 2
    ctx = distributed.init_from_env(args.device)  # under torchrun each rank evaluates its block of the data
    say = print if ctx.is_main else (lambda *a, **k: None)
    model = CRMVAE.load_from_folder(args.model, fast_kernels=args.fast_kernels).to(ctx.device)
    if args.data:
        dataset = torch.load(args.data, map_location="cpu", weights_only=False)
        what = args.data
    else:
        dataset = synthetic.make_dataset(args.n_test, seed=args.seed + 1, missing_rate=0.0)
        what = f"the synthetic held-out set ({args.n_test} samples, seed {args.seed + 1}, as train's)"
    n = len(next(iter(dataset["data"].values()))) if isinstance(dataset, dict) else len(dataset)
    say(f"crmvae-fast evaluate: {ctx.world_size} process{'es' if ctx.world_size > 1 else ''} on {ctx.device}, "
        f"model {args.model}, data {what}", flush=True)
    torch.manual_seed(args.seed + ctx.rank)
    t0 = time.perf_counter()
    if args.cond_mod is None:
        nll = evaluate_joint_nll(model, dataset, K=args.k, batch_size_K=args.batch_size_k,
                                 batch_size=args.batch_size, progress=not args.quiet)
        say(f"joint NLL (K={args.k}): {nll / n:.4f} per sample ({nll:.2f} summed over {n}; "
            f"{time.perf_counter() - t0:.2f} s)")
    else:
        gen = args.gen_mod.split(",")
        nll = evaluate_cond_nll(model, dataset, args.cond_mod.split(","), gen, K=args.k,
                                batch_size_K=args.batch_size_k, batch_size=args.batch_size, progress=not args.quiet)
        for m, v in nll.items():
            say(f"conditional NLL of {m} given {args.cond_mod} (K={args.k}): {v:.2f} summed over the points that "
                f"observe {m} and one of {args.cond_mod}")
    distributed.shutdown(ctx)
    return 0


# --------------------------------------------------------------------------------------------------- kernels
def cmd_kernels(args) -> int:
    from . import kernel_report

    if min(args.M, args.B, args.D) < 1:
        print(f"error: --M, --B and --D must be >= 1, got M={args.M} B={args.B} D={args.D}", file=sys.stderr)
        return 2
    return kernel_report.main(args.M, args.B, args.D, args.dtype, as_json=args.json)


# ------------------------------------------------------------------------------------------------------ main
def _bench_help() -> tuple:
    """``(ops, providers)`` help texts from the benchmark specs (:data:`crmvae_fast.bench.SPECS`): each op with
    its modes and the registered ops (:mod:`crmvae_fast.registry`) its fused provider runs."""
    from .bench import PROVIDERS, SPECS

    ops = "; ".join(f"{name} ({'/'.join(spec.modes)}; fused runs {'+'.join(spec.uses)})"
                    for name, spec in SPECS.items())
    return ops, ",".join(PROVIDERS)


class _DefaultsHelp(argparse.HelpFormatter):
    """Shows each option's default in ``--help`` unless its help already names it (or it has none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = action.nargs == 0  # --quiet, --fast-kernels: their help says what they switch
        if "default" in text or not action.option_strings or flag or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="crmvae-fast", description="CRMVAE with fused kernels: info, bench, train.")
    p.add_argument("--version", action="version", version=f"crmvae-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,bench,train,evaluate,kernels}")
    sub.required = True

    pi = sub.add_parser("info", help="which fast paths (Triton, C++/CUDA extension) are live here")
    pi.add_argument("--json", action="store_true", help="print the dict as JSON")
    pi.set_defaults(func=cmd_info)

    pb = sub.add_parser("bench", help="run the benchmark suite on this machine's device")
    pb.add_argument("--quick", action="store_true", help="small sizes only (under a minute on a 2-core CPU)")
    pb.add_argument("--readme", nargs="?", const="all", default=None, metavar="ROW",
                    help="measure and print the README's results table (or one ROW of nll-3x32, nll-784+10, "
                         "train-step, launches), headed by this machine and its versions; 13 minutes on a loaded "
                         "2-core CPU (2.2 minutes of CPU time, one thread)")
    pb.add_argument("--smoke", action="store_true",
                    help="tiny sizes, few repetitions: checks the plumbing, the numbers mean nothing")
    pb.add_argument("--json", metavar="PATH", default=None,
                    help="append the rows to this JSON-lines file (default $CRMVAE_BENCH_JSON, else "
                         "./crmvae_fast_bench/results.jsonl in the working directory)")
    pb.add_argument("--plot", metavar="PATH", default=None,
                    help="PNG of speed-up against size (default: speedup.png beside the JSON file)")
    pb.add_argument("--no-plot", action="store_true", help="write no plot")
    ops_help, providers_help = _bench_help()
    pb.add_argument("--ops", default=None, help="comma-separated subset of the benchmarked ops: " + ops_help)
    pb.add_argument("--providers", default=None, help="comma-separated subset of " + providers_help)
    pb.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype of the latent step (the other ops run in float32)")
    pb.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when present)")
    pb.add_argument("--budget-s", type=float, default=None,
                    help="record the cases left after this many seconds as skipped")
    pb.add_argument("--quiet", action="store_true", help="no per-case log lines")
    pb.set_defaults(func=cmd_bench)

    pt = sub.add_parser("train", help="train CRMVAE on the embedded synthetic dataset")
    pt.add_argument("--epochs", type=int, default=10, help="training epochs")
    pt.add_argument("--fast-kernels", dest="fast_kernels", action="store_true", default=True,
                    help="fused kernels (default)")
    pt.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_false", help="the eager reference")
    pt.add_argument("--out", default="crmvae_run", help="folder the model is saved to (default crmvae_run)")
    pt.add_argument("--batch-size", type=int, default=128, help="training batch size")
    pt.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the noise")
    pt.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when present)")
    pt.add_argument("--n-train", type=int, default=4096, help="training samples (default 4096)")
    pt.add_argument("--n-test", type=int, default=512, help="held-out samples for the joint NLL (default 512)")
    pt.add_argument("--missing-rate", type=float, default=0.2,
                    help="probability that a modality of a training sample is missing (default 0.2)")
    pt.add_argument("--latent-dim", type=int, default=8, help="latent dimension")
    pt.add_argument("--beta", type=float, default=2.5, help="weight of the KL terms")
    pt.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    pt.add_argument("--nll-k", type=int, default=100, help="importance samples for the held-out NLL (default 100)")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.add_argument("--compile", action="store_true",
                    help="run forward + backward under torch.compile(mode='reduce-overhead', fullgraph=True) "
                         "(one CUDA graph per step on a GPU) with fused Adam; the first steps compile, and a "
                         "last batch of another size compiles once more")
    pt.set_defaults(func=cmd_train)

    pe = sub.add_parser("evaluate", help="the joint (or conditional) NLL of a saved model over a dataset; "
                                         "under torchrun split over the processes")
    pe.add_argument("--model", default="crmvae_run", help="folder of a saved model (default crmvae_run)")
    pe.add_argument("--data", default=None, help="torch.save'd dataset: {'data': ..., 'masks': ...} or a "
                                                  "MultiVae dataset (default: the synthetic held-out set)")
    pe.add_argument("--n-test", type=int, default=512, help="size of the synthetic held-out set (default 512)")
    pe.add_argument("--seed", type=int, default=0, help="train's --seed: the held-out set uses seed + 1")
    pe.add_argument("--K", dest="k", type=int, default=1000, help="importance samples per point (default 1000)")
    pe.add_argument("--batch-size-K", dest="batch_size_k", type=int, default=100,
                    help="samples decoded at once per point (default 100)")
    pe.add_argument("--batch-size", type=int, default=512, help="points per call (default 512)")
    pe.add_argument("--cond-mod", default=None, help="comma-separated conditioning modalities (conditional NLL)")
    pe.add_argument("--gen-mod", default=None, help="comma-separated generated modalities (conditional NLL)")
    pe.add_argument("--fast-kernels", dest="fast_kernels", action="store_true", default=True)
    pe.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_false")
    pe.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    pe.add_argument("--quiet", action="store_true", help="no progress bar")
    pe.set_defaults(func=cmd_evaluate)

    pk = sub.add_parser("kernels", help="static report on the latent step's Triton kernels (sm_90 cubin, no GPU)")
    pk.add_argument("--M", type=int, default=5, help="modalities (default 5)")
    pk.add_argument("--B", type=int, default=4096, help="batch size (default 4096)")
    pk.add_argument("--D", type=int, default=512, help="latent dimensions (default 512)")
    pk.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pk.add_argument("--json", action="store_true", help="print the rows as JSON")
    pk.set_defaults(func=cmd_kernels)
    for sp in (pi, pb, pt, pe, pk):
        sp.formatter_class = _DefaultsHelp
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
