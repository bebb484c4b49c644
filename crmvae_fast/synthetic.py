"""A small multimodal dataset generated on the fly (no download), for ``crmvae-fast train`` and the tests.

Three modalities of different shapes share one latent cause ``c ~ N(0, I_4)``:

* ``"image"`` (1, 12, 12): a smooth pattern ``sigmoid(A c)`` plus a little noise, clipped to [0, 1]
  (pixel intensities; modelled with a normal decoder);
* ``"vector"`` (16,): ``0.5 + 0.25 tanh(V c)`` plus normal noise of std 0.05;
* ``"label"`` (10,): a one-hot class, the argmax of ``W c`` plus Gumbel noise (categorical decoder).

A fraction ``missing_rate`` of the (sample, modality) pairs is missing: ``masks[m][b]`` is False and the data
holds zeros there. No sample is ever fully missing (one of its modalities is switched back on).

Everything comes from one ``torch.Generator`` seeded with ``seed``: the same seed gives the same tensors. The
mixing matrices ``A, V, W`` come from a fixed seed, so train and test sets with different seeds share one
generative process.

>>> train = make_dataset(1024, seed=0)
>>> for batch in batches(train, 128, shuffle=True, seed=0):
...     out = model(batch)  # batch = {"data": {...}, "masks": {...}}
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

#: Modality name -> shape of one sample (MultiVae's ``input_dims``).
INPUT_DIMS = {"image": (1, 12, 12), "vector": (16,), "label": (10,)}
#: Modality name -> decoder distribution (MultiVae's ``decoders_dist``).
DECODERS_DIST = {"image": "normal", "vector": "normal", "label": "categorical"}
#: Modality name -> decoder distribution parameters (MultiVae's ``decoder_dist_params``).
DECODER_DIST_PARAMS = {"image": {"scale": 0.1}, "vector": {"scale": 0.1}}
#: Dimension of the shared latent cause.
CAUSE_DIM = 4
_MIXING_SEED = 1234


def model_config_kwargs(latent_dim: int = 8) -> dict:
    """Keyword arguments for ``CRMVAEConfig`` that fit this dataset (default MLP architectures)."""
    return dict(
        n_modalities=len(INPUT_DIMS),
        latent_dim=latent_dim,
        input_dims={m: tuple(s) for m, s in INPUT_DIMS.items()},
        decoders_dist=dict(DECODERS_DIST),
        decoder_dist_params={m: dict(p) for m, p in DECODER_DIST_PARAMS.items()},
    )


def _mixing():
    g = torch.Generator().manual_seed(_MIXING_SEED)
    # A smooth image basis: each latent coordinate drives a Gaussian bump at a fixed place, signed.
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    centres = torch.rand(CAUSE_DIM, 2, generator=g) * 8 + 2
    widths = torch.rand(CAUSE_DIM, generator=g) * 1.5 + 1.5
    bumps = torch.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2)
                      / (2 * widths[:, None, None] ** 2))
    A = 3.0 * bumps.reshape(CAUSE_DIM, 144)  # (4, 144)
    V = torch.randn(CAUSE_DIM, 16, generator=g)
    W = 2.0 * torch.randn(CAUSE_DIM, 10, generator=g)
    return A, V, W


def make_dataset(n: int, seed: int = 0, missing_rate: float = 0.2, dtype: torch.dtype = torch.float32) -> dict:
    """``n`` samples as ``{"data": {name: (n, *shape)}, "masks": {name: (n,) bool}}`` (the model's input
    format), plus ``"labels"`` (n,) int64 (the class of the label modality, also where it is missing).

    ``missing_rate`` in [0, 1): the probability that a modality of a sample is missing; 0 gives complete data
    (all masks True). No sample has all of its modalities missing.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
    g = torch.Generator().manual_seed(int(seed))
    A, V, W = _mixing()
    c = torch.randn(n, CAUSE_DIM, generator=g)

    image = torch.sigmoid(c @ A - 0.5) + 0.05 * torch.randn(n, 144, generator=g)
    image = image.clamp(0.0, 1.0).reshape(n, 1, 12, 12)
    vector = 0.5 + 0.25 * torch.tanh(c @ V) + 0.05 * torch.randn(n, 16, generator=g)
    u = torch.rand(n, 10, generator=g).clamp_min(1e-12)
    gumbel = -torch.log(-torch.log(u))
    labels = torch.argmax(c @ W + 0.5 * gumbel, dim=-1)
    label = torch.nn.functional.one_hot(labels, 10).to(torch.float32)

    data = {"image": image, "vector": vector, "label": label}
    names = list(data)
    observed = torch.rand(len(names), n, generator=g) >= missing_rate  # (M, n)
    # Switch one modality (drawn at random) back on for each sample that would have none.
    rescue = torch.randint(0, len(names), (n,), generator=g)
    empty = ~observed.any(0)
    observed[rescue, torch.arange(n)] |= empty
    masks = {m: observed[i].clone() for i, m in enumerate(names)}
    data = {
        m: torch.where(masks[m].reshape(n, *([1] * (x.dim() - 1))), x, torch.zeros(())).to(dtype)
        for m, x in data.items()
    }
    return {"data": data, "masks": masks, "labels": labels}


def subset(dataset: dict, index: torch.Tensor) -> dict:
    """The samples ``index`` of a dataset made by :func:`make_dataset`, same format."""
    out = {
        "data": {m: x[index] for m, x in dataset["data"].items()},
        "masks": {m: w[index] for m, w in dataset["masks"].items()},
    }
    if "labels" in dataset:
        out["labels"] = dataset["labels"][index]
    return out


def to_device(batch: dict, device) -> dict:
    """A copy of ``batch`` with every tensor on ``device``."""
    return {
        k: ({m: t.to(device) for m, t in v.items()} if isinstance(v, dict) else v.to(device))
        for k, v in batch.items()
    }


def batches(
    dataset: dict, batch_size: int, shuffle: bool = False, seed: Optional[int] = None, drop_last: bool = False
) -> Iterator[dict]:
    """Yield ``{"data", "masks", "labels"}`` batches of ``dataset`` (shuffled with ``seed`` if asked)."""
    n = len(dataset["labels"]) if "labels" in dataset else len(next(iter(dataset["data"].values())))
    if shuffle:
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) == 0:
            break
        yield subset(dataset, idx)


def to_multivae(dataset: dict, with_masks: bool = True):
    """The dataset as a MultiVae ``IncompleteDataset`` (or ``MultimodalBaseDataset`` when ``with_masks`` is
    False). Needs ``multivae`` installed."""
    from multivae.data.datasets.base import IncompleteDataset, MultimodalBaseDataset

    if with_masks:
        return IncompleteDataset(data=dict(dataset["data"]), masks=dict(dataset["masks"]),
                                 labels=dataset.get("labels"))
    return MultimodalBaseDataset(data=dict(dataset["data"]), labels=dataset.get("labels"))
