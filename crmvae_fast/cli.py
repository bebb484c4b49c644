"""The ``crmvae-fast`` command (also ``python -m crmvae_fast``).

* ``crmvae-fast info``: which fast paths are live here (:func:`crmvae_fast.backend_info`), as a table.
* ``crmvae-fast doctor``: checks this machine (versions, every op against its eager twin on each device); its
  options come from :mod:`crmvae_fast.doctor`.
* ``crmvae-fast bench [--quick] [--json PATH] [--plot PATH] [--ops ...]``: the benchmark suite
  (:mod:`crmvae_fast.bench`) on whatever device is present: a table of times and speed-ups, JSON rows appended
  to one file (default ``./crmvae_fast_bench/results.jsonl``), a PNG plot. ``--ops`` takes the benchmarked ops
  of :data:`crmvae_fast.bench.SPECS`.
* ``crmvae-fast train [--epochs N] [--fast-kernels/--no-fast-kernels] [--out DIR] ...``: trains CRMVAE (default
  MLP architectures) with Adam on the embedded synthetic dataset (:mod:`crmvae_fast.synthetic`), reports the
  per-epoch loss and samples per second, saves the model in MultiVae's folder format and reports the held-out
  joint NLL. Under ``torchrun --nproc_per_node=N -m crmvae_fast train ...`` it trains one model with DDP over N
  processes (:mod:`crmvae_fast.distributed`): each rank sees 1/N of every epoch, rank 0 prints and saves.
* ``crmvae-fast evaluate [--model DIR] [--data PATH] [--K 1000] [--cond-mod A --gen-mod B]``: the joint (or
  conditional) NLL of a saved model summed over a dataset; under torchrun each process takes its share.
* ``crmvae-fast kernels [--M 5 --B 4096 --D 512 --dtype float32]``: a static report on the latent step's Triton
  kernels from their sm_90 cubin, no GPU needed (:mod:`crmvae_fast.kernel_report`): registers, spills,
  occupancy, SASS warp-instructions per element and the modelled issue time against memory time.

Every bad argument is refused before any work, with one line on stderr (``crmvae-fast <command>: error: ...``)
and exit code 2: argparse's ``type=`` functions below check each value as it is parsed, the checks that need
more (the model folder, the data file, modality names) run right after, and :func:`main` turns the package's
errors for bad input (``ValueError``, ``TypeError``, ``FileNotFoundError``) into that line. Torch, triton and
the benchmark library are imported only by the commands that use them, so ``--help`` and ``--version`` are quick.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import List, Optional

#: The errors a command raises for bad user input; :func:`main` prints them as one line and exits 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


class UsageError(ValueError):
    """A bad command-line value found after parsing (a missing model folder, an unknown modality, ...)."""


# ------------------------------------------------------------------------------------------- argument types
def _number(text: str, kind, what: str, ok) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes, sample numbers)."""
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (``--epochs``)."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def seed(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32)."""
    return _number(text, int, "a seed, an integer from 0 to 4294967295", lambda v: 0 <= v < 2 ** 32)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``--lr``, ``--budget-s``)."""
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (``--beta``)."""
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """argparse type: a probability in [0, 1) (``--missing-rate``: 1 would leave no modality observed)."""
    return _number(text, float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:<index>``; a CUDA device must exist on this machine."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text.strip())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")
    if m.group(1) == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r} asks for a GPU, but CUDA is not available here "
                                             f"(torch {torch.__version__}); use --device cpu")
        if m.group(2) is not None and int(m.group(2)) >= count:
            raise argparse.ArgumentTypeError(f"{text!r} asks for GPU {m.group(2)}, but this machine has {count} "
                                             f"(cuda:0 to cuda:{count - 1})")
    return text.strip()


def names(text: str) -> List[str]:
    """argparse type: a comma-separated list of names, none empty (``--ops``, ``--cond-mod``, ...)."""
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def _can_write_in(folder: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def output_file(text: str) -> str:
    """argparse type: a file to write, in a folder that exists and is writable (``--json``, ``--plot``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    path = os.path.abspath(os.path.expanduser(text))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r} is in {folder}, which is not a folder; create it first")
    if not _can_write_in(folder) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written (no write permission); pick another path")
    return text


def output_folder(text: str) -> str:
    """argparse type: a folder to save a model in (``train --out``): an existing writable folder, or a path that
    can be created; not an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder (it is created if missing)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {existing} is a file")
    if not _can_write_in(existing):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: no write permission in {existing}")
    return text


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
    """``crmvae-fast info``: :func:`crmvae_fast.backend_info` as a table (or JSON)."""
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


# ---------------------------------------------------------------------------------------------------- doctor
#: The doctor's one-line description (top-level help and its own parser).
DOCTOR_HELP = "check this machine: versions, every op against its eager twin on each device"


def cmd_doctor(args) -> int:
    """``crmvae-fast doctor``: its parser is built here, from :func:`crmvae_fast.doctor.add_arguments`, so that
    the other commands and ``--help`` do not import the doctor (and torch)."""
    from . import doctor

    p = argparse.ArgumentParser(prog="crmvae-fast doctor", description=DOCTOR_HELP, formatter_class=_DefaultsHelp)
    doctor.add_arguments(p)
    return doctor.run(p.parse_args(args.rest))


# ----------------------------------------------------------------------------------------------------- bench
#: What each benchmark provider times (the help text; tests/test_cli.py checks it names crmvae_fast.bench.PROVIDERS).
PROVIDER_HELP = {"eager": "the eager reference math", "fused": "this package's fused ops",
                 "compile": "torch.compile of the eager math", "multivae": "MultiVae 1.0.3 on the same weights"}


def _check_names(option: str, given: Optional[List[str]], known) -> list:
    if given is None:
        return list(known)
    unknown = [g for g in given if g not in known]
    if unknown:
        raise UsageError(f"{option}: unknown {', '.join(map(repr, unknown))}; expected some of {','.join(known)}")
    return given


def cmd_bench(args) -> int:
    """``crmvae-fast bench``: checks ``--ops`` and ``--providers`` against the benchmark specs, then runs;
    ``--readme`` measures the README's results table instead (:mod:`crmvae_fast.bench.readme`)."""
    if args.readme:
        from .bench.readme import main as readme_table

        return readme_table(args.readme, args.device, smoke=args.smoke)
    import torch

    from . import bench

    ops = _check_names("--ops", args.ops, bench.OPS)
    providers = _check_names("--providers", args.providers, bench.PROVIDERS)
    dev = torch.device(args.device) if args.device else bench.default_device()
    return _run_bench(args, dev, ops, providers)


def _run_bench(args, dev, ops: list, providers: list) -> int:
    from . import bench

    kind = "smoke (tiny sizes, numbers mean nothing)" if args.smoke else ("quick" if args.quick else "full")
    print(f"crmvae-fast bench: {kind} suite on {bench.device_name(dev)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and dev.type == "cpu":
        print("note: TRITON_INTERPRET=1, the fused provider runs the Triton interpreter: its times mean nothing")
    t0 = time.perf_counter()
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    path = args.json or bench.default_results_path()
    partial = path + ".partial"  # rows saved as they come: a run killed half-way leaves them here
    if os.path.exists(partial):
        os.remove(partial)
    rows = bench.run_suite(dev, quick=args.quick, smoke=args.smoke, ops=ops, providers=providers,
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
def cmd_train(args) -> int:
    """``crmvae-fast train``: every value was checked while parsing (``--out`` included), so nothing found
    after the first epoch can lose the trained model; the work is :func:`_train`."""
    import torch

    from . import distributed

    # Under torchrun: one process group (NCCL on GPUs, gloo on CPUs), GPU LOCAL_RANK per rank; else one process.
    ctx = distributed.init_from_env(args.device)
    say = print if ctx.is_main else (lambda *a, **k: None)  # only rank 0 prints
    world = ctx.world_size
    per_rank = -(-args.n_train // world)
    say(f"crmvae-fast train: {world} process{'es' if world > 1 else ''}"
        + (f" (torchrun, DistributedDataParallel over {ctx.backend}, {per_rank} samples and batches of "
           f"{args.batch_size} per rank per epoch)" if world > 1 else " (no process group)"), flush=True)
    if os.path.isfile(os.path.join(args.out, "model_config.json")):
        say(f"crmvae-fast train: {args.out} holds a saved model; this run's model will replace it")
    torch.manual_seed(args.seed)
    return _train(args, ctx, say)


def _train(args, ctx, say) -> int:
    import torch

    from . import CRMVAE, CRMVAEConfig, distributed, evaluate_joint_nll, synthetic
    from .evaluation import _Progress

    device, rank, world = ctx.device, ctx.rank, ctx.world_size
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
            bar.update(lambda: f"loss/sample {float(out['loss'].detach()) / b:.4g}")
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

    if ctx.is_main:  # only rank 0 saves; before the NLL, so nothing after training can lose the model
        model.save(args.out)
    say(f"model saved to {args.out} (MultiVae folder format: CRMVAE.load_from_folder({args.out!r}))", flush=True)
    t0 = time.perf_counter()
    # each rank evaluates its block of the test set, the sum is all-reduced
    nll = evaluate_joint_nll(model, test, K=args.nll_k, batch_size_K=min(100, args.nll_k),
                             batch_size=max(1, args.n_test), progress=False)
    say(f"held-out joint NLL (K={args.nll_k}): {nll / args.n_test:.4f} per sample "
        f"({nll:.2f} summed over {args.n_test}; {time.perf_counter() - t0:.2f} s)")
    distributed.shutdown(ctx)
    return 0


# -------------------------------------------------------------------------------------------------- evaluate
def _load_data_file(path: str):
    """``--data``: :func:`crmvae_fast.persistence.load_data_file` (weights_only=True, errors naming the file)."""
    from .persistence import load_data_file

    return load_data_file(path)


def _points(dataset, what: str) -> int:
    import torch

    data = dataset.get("data") if isinstance(dataset, dict) else getattr(dataset, "data", None)
    if isinstance(data, dict) and data and all(isinstance(x, torch.Tensor) and x.dim() for x in data.values()):
        return len(next(iter(data.values())))
    raise UsageError(f"{what} holds a {type(dataset).__name__}, expected a dataset: {{'data': {{name: (n, ...) "
                     "tensor}, 'masks': {name: (n,) bool tensor}} or a MultiVae dataset")


def _modalities(option: str, given: List[str], model, folder: str) -> List[str]:
    known = list(model.encoders)
    unknown = [m for m in given if m not in known]
    if unknown:
        raise UsageError(f"{option}: the model in {folder} has no modality {', '.join(map(repr, unknown))}; its "
                         f"modalities are {','.join(known)}")
    return given


def cmd_evaluate(args) -> int:
    """``crmvae-fast evaluate``: checks the model folder, the data and the modality names, says what it loads
    and what it scores, then scores (:func:`_score`)."""
    if (args.cond_mod is None) != (args.gen_mod is None):
        raise UsageError("give both --cond-mod and --gen-mod (conditional NLL), or neither (joint NLL)")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: {'not a folder' if os.path.exists(args.model) else 'no such folder'}"
                         f"; give the folder of a saved model (crmvae-fast train --out {args.model} writes one)")
    import torch

    from . import CRMVAE, distributed, synthetic

    ctx = distributed.init_from_env(args.device)  # under torchrun each rank evaluates its block of the data
    say = print if ctx.is_main else (lambda *a, **k: None)
    say(f"crmvae-fast evaluate: {ctx.world_size} process{'es' if ctx.world_size > 1 else ''} on {ctx.device}, "
        f"model {args.model}", flush=True)
    if args.data:
        say(f"loading the data from {args.data}", flush=True)
        dataset = _load_data_file(args.data)
        what = f"--data {args.data}"
    else:
        dataset = synthetic.make_dataset(args.n_test, seed=args.seed + 1, missing_rate=0.0)
        what = f"the synthetic held-out set ({args.n_test} samples, seed {args.seed + 1}, as train's)"
    n = _points(dataset, what)
    say(f"loading the model from {args.model}", flush=True)
    model = CRMVAE.load_from_folder(args.model, fast_kernels=args.fast_kernels).to(ctx.device)
    cond = gen = None
    if args.cond_mod is not None:
        cond = _modalities("--cond-mod", args.cond_mod, model, args.model)
        gen = _modalities("--gen-mod", args.gen_mod, model, args.model)
    task = "the joint NLL" if cond is None else f"the NLL of {','.join(gen)} given {','.join(cond)}"
    say(f"scoring {n} points of {what} with K={args.k} samples each ({task}; fast_kernels={model.fast_kernels}, "
        f"batches of {args.batch_size} points)", flush=True)
    torch.manual_seed(args.seed + ctx.rank)
    return _score(args, ctx, model, dataset, n, cond, gen, say)


def _score(args, ctx, model, dataset, n: int, cond, gen, say) -> int:
    from . import distributed, evaluate_cond_nll, evaluate_joint_nll

    t0 = time.perf_counter()
    if cond is None:
        nll = evaluate_joint_nll(model, dataset, K=args.k, batch_size_K=args.batch_size_k,
                                 batch_size=args.batch_size, progress=not args.quiet)
        say(f"joint NLL (K={args.k}): {nll / n:.4f} per sample ({nll:.2f} summed over {n}; "
            f"{time.perf_counter() - t0:.2f} s)")
    else:
        nll = evaluate_cond_nll(model, dataset, cond, gen, K=args.k, batch_size_K=args.batch_size_k,
                                batch_size=args.batch_size, progress=not args.quiet)
        given = ",".join(cond)
        for m, v in nll.items():
            say(f"conditional NLL of {m} given {given} (K={args.k}): {v:.2f} summed over the points that "
                f"observe {m} and one of {given}")
    distributed.shutdown(ctx)
    return 0


# --------------------------------------------------------------------------------------------------- kernels
def cmd_kernels(args) -> int:
    """``crmvae-fast kernels``: :func:`crmvae_fast.kernel_report.main`."""
    from . import kernel_report

    return kernel_report.main(args.M, args.B, args.D, args.dtype, as_json=args.json)


# ------------------------------------------------------------------------------------------------------ main
class _DefaultsHelp(argparse.HelpFormatter):
    """Shows each option's default in ``--help`` unless its help already names it (or it has none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        flag = action.nargs == 0  # --quiet, --fast-kernels: their help says what they switch
        if "default" in text or not action.option_strings or flag or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


#: Subcommands whose parser is built when they run (from a module that imports torch): the top-level parser
#: hands them the arguments it does not know.
LAZY_COMMANDS = ("doctor",)


def _benchmarked_ops() -> str:
    """The benchmarked ops, from the op registry (which imports nothing heavy): each entry names its benchmark."""
    from . import registry

    return ", ".join(dict.fromkeys(spec.bench for spec in registry.OPS.values()))


def build_parser() -> argparse.ArgumentParser:
    """The ``crmvae-fast`` parser; building it (and ``--help``, ``--version``) imports no torch."""
    from . import __version__

    p = argparse.ArgumentParser(prog="crmvae-fast", description="CRMVAE (MultiVae's, number for number) with "
                                "fused kernels: check the machine, benchmark, train, evaluate.")
    p.add_argument("--version", action="version", version=f"crmvae-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    pi = sub.add_parser("info", help="which fast paths (Triton, C++/CUDA extension) are live here")
    pi.add_argument("--json", action="store_true", help="print the dict as JSON")
    pi.set_defaults(func=cmd_info)

    pd = sub.add_parser("doctor", help=DOCTOR_HELP, add_help=False)
    pd.set_defaults(func=cmd_doctor)

    pb = sub.add_parser("bench", help="run the benchmark suite on this machine's device")
    size = pb.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small sizes only (measured: 39 s on an idle 2-core CPU with MultiVae installed, several "
                           "times that on a loaded one; --budget-s caps it)")
    size.add_argument("--smoke", action="store_true",
                      help="tiny sizes, few repetitions: checks the plumbing, the numbers mean nothing")
    pb.add_argument("--readme", nargs="?", const="all", default=None, metavar="ROW",
                    help="measure and print the README's results table (or one ROW of nll-3x32, nll-784+10, "
                         "train-step, launches), headed by this machine and its versions; 76 s on an idle 2-core CPU, "
                         "over 10 minutes on a loaded one")
    pb.add_argument("--json", metavar="PATH", type=output_file, default=None,
                    help="append the rows to this JSON-lines file (default $CRMVAE_BENCH_JSON, else "
                         "./crmvae_fast_bench/results.jsonl in the working directory)")
    pb.add_argument("--plot", metavar="PATH", type=output_file, default=None,
                    help="PNG of speed-up against size (default: speedup.png beside the JSON file)")
    pb.add_argument("--no-plot", action="store_true", help="write no plot")
    pb.add_argument("--ops", type=names, metavar="OP[,OP...]", default=None,
                    help=f"comma-separated subset of the benchmarked ops: {_benchmarked_ops()} (default: all)")
    pb.add_argument("--providers", type=names, metavar="P[,P...]", default=None,
                    help="comma-separated subset of the providers: "
                         + "; ".join(f"{k} ({v})" for k, v in PROVIDER_HELP.items()) + " (default: all)")
    pb.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype of the latent step (the other ops run in float32)")
    pb.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (default: cuda when present)")
    pb.add_argument("--budget-s", type=positive_float, default=None,
                    help="record the cases left after this many seconds as skipped")
    pb.add_argument("--quiet", action="store_true", help="no per-case log lines")
    pb.set_defaults(func=cmd_bench)

    pt = sub.add_parser("train", help="train CRMVAE on the embedded synthetic dataset and save it")
    pt.add_argument("--epochs", type=nonnegative_int, default=10, help="training epochs")
    pt.add_argument("--fast-kernels", dest="fast_kernels", action="store_true", default=True,
                    help="fused kernels (default)")
    pt.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_false", help="the eager reference")
    pt.add_argument("--out", type=output_folder, default="crmvae_run",
                    help="folder the model is saved to; a model saved there before is replaced (default crmvae_run)")
    pt.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    pt.add_argument("--seed", type=seed, default=0, help="seed of the data, the weights and the noise")
    pt.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (default: cuda when present)")
    pt.add_argument("--n-train", type=positive_int, default=4096, help="training samples (default 4096)")
    pt.add_argument("--n-test", type=positive_int, default=512,
                    help="held-out samples for the joint NLL (default 512)")
    pt.add_argument("--missing-rate", type=probability, default=0.2,
                    help="probability in [0, 1) that a modality of a training sample is missing (default 0.2)")
    pt.add_argument("--latent-dim", type=positive_int, default=8, help="latent dimension")
    pt.add_argument("--beta", type=nonnegative_float, default=2.5, help="weight of the KL terms")
    pt.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    pt.add_argument("--nll-k", type=positive_int, default=100,
                    help="importance samples for the held-out NLL (default 100)")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.add_argument("--compile", action="store_true",
                    help="run forward + backward under torch.compile(mode='reduce-overhead', fullgraph=True) "
                         "(one CUDA graph per step on a GPU) with fused Adam; the first steps compile, and a "
                         "last batch of another size compiles once more")
    pt.set_defaults(func=cmd_train)

    pe = sub.add_parser("evaluate", help="the joint (or conditional) NLL of a saved model over a dataset; "
                                         "under torchrun split over the processes")
    pe.add_argument("--model", default="crmvae_run", help="folder of a saved model (default crmvae_run)")
    pe.add_argument("--data", default=None, help="torch.save'd dataset: {'data': ..., 'masks': ...}, loaded with "
                                                  "weights_only=True (default: the synthetic held-out set)")
    pe.add_argument("--n-test", type=positive_int, default=512,
                    help="size of the synthetic held-out set (default 512)")
    pe.add_argument("--seed", type=seed, default=0, help="train's --seed: the held-out set uses seed + 1")
    pe.add_argument("--K", dest="k", type=positive_int, default=1000,
                    help="importance samples per point (default 1000)")
    pe.add_argument("--batch-size-K", dest="batch_size_k", type=positive_int, default=100,
                    help="samples decoded at once per point (default 100)")
    pe.add_argument("--batch-size", type=positive_int, default=128,
                    help="points per call; progress is shown per call (default 128)")
    pe.add_argument("--cond-mod", type=names, default=None,
                    help="comma-separated conditioning modalities (conditional NLL)")
    pe.add_argument("--gen-mod", type=names, default=None,
                    help="comma-separated generated modalities (conditional NLL)")
    pe.add_argument("--fast-kernels", dest="fast_kernels", action="store_true", default=None,
                    help="fused kernels (default: as the model was saved)")
    pe.add_argument("--no-fast-kernels", dest="fast_kernels", action="store_false",
                    help="the eager reference (default: as the model was saved)")
    pe.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (default: cuda when present)")
    pe.add_argument("--quiet", action="store_true", help="no progress bar")
    pe.set_defaults(func=cmd_evaluate)

    pk = sub.add_parser("kernels", help="static report on the latent step's Triton kernels (sm_90 cubin, no GPU)")
    pk.add_argument("--M", type=positive_int, default=5, help="modalities (default 5)")
    pk.add_argument("--B", type=positive_int, default=4096, help="batch size (default 4096)")
    pk.add_argument("--D", type=positive_int, default=512, help="latent dimensions (default 512)")
    pk.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pk.add_argument("--json", action="store_true", help="print the rows as JSON")
    pk.set_defaults(func=cmd_kernels)
    for sp in (pi, pb, pt, pe, pk):
        sp.formatter_class = _DefaultsHelp
    for sp in (pi, pd, pb, pt, pe, pk):
        sp.set_defaults(command_parser=sp)  # main() reports arguments left over in the command's own words
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``crmvae-fast`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code: 0, 2 for bad
    input (one line on stderr, no traceback), 130 when interrupted. argparse's own errors, ``--help`` and
    ``--version`` exit through ``SystemExit`` as usual."""
    parser = build_parser()
    prog = "crmvae-fast"
    try:
        args, rest = parser.parse_known_args(argv)  # a --device cuda check imports torch: it can be interrupted
        prog = f"crmvae-fast {args.command}"
        if args.command in LAZY_COMMANDS:
            args.rest = rest
        elif rest:
            args.command_parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
