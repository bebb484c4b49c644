"""Dataset-level likelihoods: ``evaluate_joint_nll`` and ``evaluate_cond_nll``, over batches and over ranks.

Both take a whole dataset (a MultiVae ``MultimodalBaseDataset`` / ``IncompleteDataset``, a dict
``{"data": ..., "masks": ...}``, or any map-style dataset whose items are such dicts), cut it into batches of
``batch_size`` points, call the model's own method on each batch on the model's device, and sum. Under an
initialized ``torch.distributed`` process group rank r takes the r-th contiguous block of the points
(:func:`crmvae_fast.distributed.rank_range`, nothing padded or repeated) and the sums are all-reduced, so every
rank returns the same number: the answer of one process over the whole dataset.

The sums are accumulated in float64 on the device (no host sync per batch) and returned as Python floats.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed as cf_dist
from .inputs import as_count
from .nn import ModelOutput, first_parameter


def _get(obj, key):
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


class _Batches:
    """Batches of this rank's block of a dataset, as ``ModelOutput(data=..., masks=...)`` (key and attribute
    access, so our model and MultiVae's both read them), on ``device``."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, device: torch.device):
        data = _get(dataset, "data")
        self.device = device
        self.batch_size = batch_size
        if isinstance(data, Mapping) and data and all(isinstance(x, Tensor) for x in data.values()):
            self.data = data
            masks = _get(dataset, "masks")
            if masks is not None and not (isinstance(masks, Mapping) and all(isinstance(w, Tensor) and w.dim() == 1
                                                                             for w in masks.values())):
                raise ValueError(f"dataset.masks must be a dict name -> (n,) tensor, got {masks!r:.200}")
            self.masks = masks
            if any(x.dim() == 0 for x in data.values()):
                raise ValueError(f"dataset.data must hold (n, ...) tensors, got shapes "
                                 f"{ {m: tuple(x.shape) for m, x in data.items()} }")
            sizes = {m: x.shape[0] for m, x in data.items()}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"every modality of the dataset must hold the same number of points, got {sizes}")
            self.n = next(iter(sizes.values()))
            self.items = None
        elif hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and not isinstance(dataset, Mapping):
            self.items = dataset  # items are read one by one and stacked (lazily loaded datasets)
            self.n = len(dataset)
        else:
            raise ValueError(
                "expected a dataset with a 'data' dict of (n, ...) tensors (a MultiVae dataset or "
                "{'data': {...}, 'masks': {...}}), or a map-style dataset of such items; got "
                f"{type(dataset).__name__}"
            )
        if self.n < 1:
            raise ValueError("the dataset is empty: nothing to evaluate")
        self.block = cf_dist.rank_range(self.n, rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.block) // self.batch_size)

    def __iter__(self) -> Iterator[ModelOutput]:
        for start in range(self.block.start, self.block.stop, self.batch_size):
            stop = min(start + self.batch_size, self.block.stop)
            if self.items is None:
                batch = ModelOutput(data={m: x[start:stop].to(self.device) for m, x in self.data.items()})
                if self.masks is not None:
                    batch["masks"] = {m: w[start:stop].to(self.device) for m, w in self.masks.items()}
            else:
                batch = self._stack([self.items[i] for i in range(start, stop)])
            yield batch

    def _stack(self, items) -> ModelOutput:
        first = items[0]
        data = _get(first, "data")
        if not isinstance(data, Mapping):
            raise ValueError(f"dataset items must have a 'data' dict, got {type(first).__name__}")
        for it in items:
            d = _get(it, "data")
            if not isinstance(d, Mapping) or set(d) != set(data) or not all(isinstance(x, Tensor) for x in d.values()):
                raise ValueError(f"every dataset item must have a 'data' dict of tensors over the modalities "
                                 f"{list(data)}, got {d!r:.200}")
        try:
            batch = ModelOutput(data={m: torch.stack([_get(it, "data")[m] for it in items]).to(self.device)
                                      for m in data})
        except RuntimeError as exc:
            raise ValueError(f"the dataset items' tensors of one modality must have one shape; stacking them "
                             f"failed: {exc}") from exc
        if _get(first, "masks") is not None:
            try:
                batch["masks"] = {m: torch.stack([torch.as_tensor(_get(it, "masks")[m]) for it in items]).to(
                    self.device) for m in _get(first, "masks")}
            except (TypeError, ValueError, RuntimeError, KeyError) as exc:
                raise ValueError(f"every dataset item must have 'masks' of the same modalities holding a bool or "
                                 f"0/1 per item; stacking them failed: {exc}") from exc
        return batch


def _model_device(model: nn.Module) -> torch.device:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a model (an nn.Module such as crmvae_fast.CRMVAE), got {type(model).__name__}")
    p = first_parameter(model)
    if p is None:
        return torch.device("cpu")
    return p.device


class _Progress:
    """Progress on stderr: a tqdm bar when tqdm is installed, else a line every ~10 % of ``total`` steps.
    ``update(info)`` counts one step; ``info`` (optional) is a callable giving a short text such as the loss so
    far, called only when shown (every ~10 %), since reading a device value synchronizes. Shows nothing when
    ``enabled`` is False."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n, self.enabled = total, desc, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None
        self.every = max(1, total // 10)

    def update(self, info=None) -> None:
        self.n += 1
        if not self.enabled:
            return
        show = self.n % self.every == 0 or self.n == self.total
        if self.bar is not None:
            if show and info is not None:
                self.bar.set_postfix_str(info(), refresh=False)
            self.bar.update(1)
        elif show:
            print(f"  {self.desc}: {self.n}/{self.total}" + (f", {info()}" if info is not None else ""),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Unsharded:
    """Gathers an FSDP2 model's parameters for the duration (methods other than ``forward`` need them)."""

    def __init__(self, model):
        self.model = model
        self.fsdp = hasattr(model, "unshard") and hasattr(model, "reshard")

    def __enter__(self):
        if self.fsdp:
            self.model.unshard()
        return self.model

    def __exit__(self, *exc):
        if self.fsdp:
            self.model.reshard()


def _check_sizes(K, batch_size_K, batch_size) -> tuple[int, int, int]:
    """The three counts as Python ints >= 1 (numpy integers too), or the package's count errors."""
    return (as_count(K, "K", "; K is the number of importance samples per data point"),
            as_count(batch_size_K, "batch_size_K", "; it bounds the samples decoded at once"),
            as_count(batch_size, "batch_size", "; it is the number of points per call of the model"))


def _mod_list(mods, what: str) -> list:
    if isinstance(mods, str):
        return [mods]
    if isinstance(mods, (list, tuple)) and mods and all(isinstance(m, str) for m in mods):
        return list(mods)
    raise TypeError(f"{what} must be a modality name or a non-empty list of names, got {mods!r}")


@torch.no_grad()
def evaluate_joint_nll(model: nn.Module, dataset, K: int = 1000, batch_size_K: int = 100, batch_size: int = 512,
                       *, progress: bool = True) -> float:
    """``-sum_i log p(X_i)`` over the whole ``dataset``, importance-sampled with ``K`` samples per point by
    ``model.compute_joint_nll(batch, K=K, batch_size_K=batch_size_K)`` on batches of ``batch_size`` points.

    Incomplete data (masks) is supported by this package's model. Under an initialized process group each rank
    evaluates its block of points and the total is all-reduced: every rank returns the same float. ``model`` may
    be wrapped in ``DistributedDataParallel`` / ``torch.compile`` or sharded with FSDP2. ``progress``: rank 0
    shows the batches done and the NLL per point so far on stderr (a tqdm bar, or a line every ~10 % without
    tqdm). ``K``, ``batch_size_K`` and ``batch_size`` are ints >= 1 (numpy integers too); a bad count, model or
    dataset is refused before the first batch.
    """
    K, batch_size_K, batch_size = _check_sizes(K, batch_size_K, batch_size)
    rank, world = cf_dist.rank_and_world()
    inner = cf_dist.unwrap(model)
    device = _model_device(inner)
    batches = _Batches(dataset, batch_size, rank, world, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = _Progress(len(batches), f"joint NLL (K={K}), batches", progress and rank == 0)
    seen = 0
    with _Unsharded(inner) as m:
        for batch in batches:
            total += m.compute_joint_nll(batch, K=K, batch_size_K=batch_size_K).to(torch.float64)
            seen += next(iter(batch["data"].values())).shape[0]
            bar.update(lambda: f"NLL/point so far {float(total) / seen:.4g}")
    bar.close()
    return float(cf_dist.all_reduce_sum(total))


def _cond_kwargs(method, K: int, batch_size_K: int) -> dict:
    """``K=``/``batch_size_K=`` for this package's ``compute_cond_nll``, ``k_iwae=`` for MultiVae's."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        params = {}
    if "K" in params:
        kw = {"K": K}
        if "batch_size_K" in params:
            kw["batch_size_K"] = batch_size_K
        if "reduction" in params:  # sums over the scored points: exact for incomplete batches too
            kw["reduction"] = "sum"
        return kw
    if "k_iwae" in params:
        return {"k_iwae": K}
    return {"K": K, "batch_size_K": batch_size_K}


@torch.no_grad()
def evaluate_cond_nll(model: nn.Module, dataset, cond_mod: Union[list, str], gen_mod: Union[list, str],
                      K: int = 1000, batch_size_K: int = 100, batch_size: int = 512, *,
                      progress: bool = True) -> dict:
    """``-sum_i log p(x_gen,i | x_cond,i)`` over the whole ``dataset``, per generated modality: a dict
    modality -> float.

    Calls ``model.compute_cond_nll(batch, cond_mod, gen_mod, K=K, batch_size_K=batch_size_K,
    reduction="sum")`` on our CRMVAE: modality -> the NLL summed over the batch's points that observe it and a
    conditioning modality (so incomplete data counts each scored point once). MultiVae's models (signature
    ``(inputs, subset, pred_mods, k_iwae)``, complete data) return a mean, taken times the batch size. The sums
    over batches are all-reduced over ranks under an initialized process group, so every rank returns the same
    dict. ``K``, ``batch_size_K`` and ``batch_size`` are ints >= 1 (numpy integers too); ``cond_mod`` and
    ``gen_mod`` a name or a list of names.
    """
    K, batch_size_K, batch_size = _check_sizes(K, batch_size_K, batch_size)
    inner = cf_dist.unwrap(model)
    device = _model_device(inner)
    if not hasattr(inner, "compute_cond_nll"):
        raise AttributeError(f"{type(inner).__name__} has no compute_cond_nll(inputs, cond_mod, gen_mod, K, "
                             "batch_size_K); evaluate_cond_nll needs a model that has one")
    cond = _mod_list(cond_mod, "cond_mod")
    gen = _mod_list(gen_mod, "gen_mod")
    rank, world = cf_dist.rank_and_world()
    batches = _Batches(dataset, batch_size, rank, world, device)
    kw = _cond_kwargs(inner.compute_cond_nll, K, batch_size_K)
    totals: Optional[Tensor] = None
    names: Optional[list] = None
    bar = _Progress(len(batches), f"conditional NLL {cond} -> {gen} (K={K}), batches", progress and rank == 0)
    with _Unsharded(inner) as m:
        for batch in batches:
            b = next(iter(batch["data"].values())).shape[0]
            out = m.compute_cond_nll(batch, cond, gen, **kw)
            if names is None:
                names = list(gen)
                totals = torch.zeros(len(names), dtype=torch.float64, device=device)
                if set(out) != set(names):
                    raise ValueError(f"compute_cond_nll returned modalities {list(out)}, expected {names}")
            scale = 1 if kw.get("reduction") == "sum" else b  # a mean (MultiVae's models: complete data)
            totals += torch.stack([torch.as_tensor(out[n], device=device).to(torch.float64).reshape(())
                                   for n in names]) * scale
            bar.update()
    bar.close()
    if names is None:  # this rank had no points (more ranks than points): it still joins the all-reduce
        names = list(gen)
        totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    totals = cf_dist.all_reduce_sum(totals)
    return {n: float(v) for n, v in zip(names, totals.tolist())}
