"""Reading and checking model inputs before any kernel runs.

Accepted: anything with ``.data`` (dict name -> tensor) and optional ``.masks`` (dict name -> (B,) bool or
float), such as MultiVae's ``MultimodalBaseDataset``, ``IncompleteDataset``, their batches and items, or a
plain ``{"data": ..., "masks": ...}`` dict.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor


def _get(inputs, key):
    if isinstance(inputs, Mapping):
        return inputs.get(key)
    return getattr(inputs, key, None)


def as_count(value, name: str, hint: str = "") -> int:
    """``value`` as a Python int >= 1: Python and numpy integers are accepted; bools, floats (even 2.0),
    strings and tensors raise ``TypeError``, numbers below 1 ``ValueError``. ``hint`` ends both messages."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= 1 (a Python or numpy integer), got {value!r} of type "
            f"{type(value).__name__}{hint}"
        )
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}{hint}")
    return value


def read_inputs(inputs, modalities, input_dims=None, *, require_all=True, check_empty=True, dtypes=None):
    """Return ``(data, masks)``: dicts over ``modalities`` (in that order) of batched tensors, ``masks`` of
    (B,) bool tensors on the data's device, or None when the inputs carry no masks.

    Masked entries of ``data`` are replaced by zeros (a select, so NaN and inf placeholders vanish): nothing of
    a missing modality can reach a loss, a metric or a gradient. Every check runs here, before any kernel:
    ``ValueError`` (or ``TypeError`` for a value of the wrong type) on unknown or missing modality names, masks
    naming a modality the model lacks, differing batch sizes, an empty batch (B = 0), feature shapes that
    differ from ``input_dims``, 0-d masks (one unbatched item) beside batched data, masks of the wrong shape,
    dtype, values or device, tensors on different devices, and samples with no observed modality when the
    masks are on the CPU. Only metadata is read, except for CPU masks (no host-device sync).

    Dtypes: complex data is refused (``TypeError`` naming the modality). ``dtypes`` (name -> float dtype or
    None; the model passes ``crmvae_fast.nn.input_dtype`` of each encoder, the dtype of its parameters)
    casts each modality to its dtype: integer and bool data (uint8 images, 0/1 labels: by value, no scaling to
    [0, 1]) and data of another float dtype (float64 or float16 for a float32 model; under autocast too, which
    then casts for each op as usual).
    A modality whose dtype is None (an encoder holding an ``nn.Embedding``, which takes token ids, or one
    without floating parameters) is passed as given. The cast is differentiable: data that requires grad gets
    its gradient in its own dtype.

    Soft masks: a mask that is not bool must hold only 0 and 1. On the CPU that is checked here (``ValueError``
    naming the samples). Where checking would cost a host-device sync (masks on a GPU, or under
    ``torch.compile``) it is checked on the device with ``torch._assert_async``: a RuntimeError with the same
    sentence on the CPU, a device-side assertion that stops the process on a GPU. Bool masks skip the check.
    """
    data = _get(inputs, "data")
    if not isinstance(data, Mapping):
        raise ValueError(
            "expected inputs with a 'data' dict (name -> tensor), e.g. a MultiVae dataset or "
            f"{{'data': {{...}}, 'masks': {{...}}}}; got {type(inputs).__name__}"
        )
    masks = _get(inputs, "masks")
    if masks is not None and not isinstance(masks, Mapping):
        raise ValueError(f"inputs.masks must be a dict name -> (B,) tensor, got {type(masks).__name__}")
    known = list(modalities)
    unknown = [m for m in data if m not in known]
    if unknown:
        raise ValueError(f"unknown modality name(s) {unknown} in inputs.data; the model has {known}")
    if masks is not None:
        unknown = [m for m in masks if m not in known]
        if unknown:
            raise ValueError(
                f"unknown modality name(s) {unknown} in inputs.masks; the model has {known}. "
                "Rename or drop those masks (a mask of a modality the model lacks would be ignored)."
            )
    if require_all:
        missing = [m for m in known if m not in data]
        if missing:
            raise ValueError(f"inputs.data lacks modality(ies) {missing}; the model needs all of {known}")
    names = [m for m in known if m in data]
    if not names:
        raise ValueError(f"inputs.data holds no modality; expected some of {known}")
    for m in names:
        if not isinstance(data[m], Tensor):
            raise ValueError(f"inputs.data[{m!r}] must be a torch.Tensor, got {type(data[m]).__name__}")
        if data[m].is_complex():
            raise TypeError(f"inputs.data[{m!r}] is {data[m].dtype}, expected real data (float, integer or bool); "
                            "pass its real part or its magnitude")

    # An unbatched item (one sample from dataset[i]) has 0-d masks or data shaped exactly like input_dims.
    dims = {m: tuple(input_dims[m]) for m in names if input_dims is not None and m in input_dims}
    unbatched = False
    if masks is not None and all(_is_scalar(masks.get(m)) for m in names):
        batched = [m for m in dims if tuple(data[m].shape) != dims[m] and tuple(data[m].shape[1:]) == dims[m]]
        if batched:
            raise ValueError(
                f"inputs.masks are 0-d (one unbatched item) but inputs.data[{batched[0]!r}] is batched, shape "
                f"{tuple(data[batched[0]].shape)} = (B, *input_dims); give (B,) masks for batched data"
            )
        unbatched = True
    elif masks is None and dims and len(dims) == len(names) and all(
        tuple(data[m].shape) == dims[m] for m in names
    ):
        unbatched = True
    if unbatched:
        data = {m: data[m].unsqueeze(0) for m in names}
        if masks is not None:
            masks = {m: torch.as_tensor(masks[m]).reshape(1) for m in names}
    else:
        data = {m: data[m] for m in names}

    sizes = {m: data[m].shape[0] if data[m].dim() else None for m in names}
    # a list, not the dict view: torch 2.8's dynamo cannot trace dict_values.__contains__ (a graph break)
    if len(set(sizes.values())) != 1 or None in list(sizes.values()):
        raise ValueError(f"every modality must have the same batch size (first dim); got {sizes}")
    B = next(iter(sizes.values()))
    if B == 0:
        raise ValueError(f"the batch is empty (B = 0 samples in every modality, shapes "
                         f"{ {m: tuple(data[m].shape) for m in names} }); give at least one sample")
    for m, d in dims.items():
        if tuple(data[m].shape[1:]) != d:
            raise ValueError(
                f"inputs.data[{m!r}] must have shape (B, *input_dims[{m!r}]) = (B, {', '.join(map(str, d))}) as "
                f"in the model_config, got {tuple(data[m].shape)}; reshape the data (or fix input_dims)"
            )
    devices = {m: data[m].device for m in names}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all modalities must be on one device; got {({m: str(d) for m, d in devices.items()})}")
    device = next(iter(devices.values()))

    if dtypes is not None:
        data = {m: x if dtypes.get(m) in (None, x.dtype) else x.to(dtypes[m]) for m, x in data.items()}
    if masks is None:
        return data, None
    out_masks = {}
    for m in names:
        if m not in masks:
            raise ValueError(f"inputs.masks lacks modality {m!r}; it has {list(masks)}")
        w = masks[m]
        if not isinstance(w, Tensor):
            try:
                w = torch.as_tensor(w)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(
                    f"inputs.masks[{m!r}] must be a (B,) bool or float tensor, got {type(masks[m]).__name__}"
                ) from exc
        if w.shape != (B,):
            raise ValueError(f"inputs.masks[{m!r}] must have shape ({B},) (the batch size), got {tuple(w.shape)}")
        if w.dtype.is_complex or not (w.dtype == torch.bool or w.dtype.is_floating_point or _is_int(w.dtype)):
            raise ValueError(f"inputs.masks[{m!r}] must be bool, float or integer, got {w.dtype}")
        if w.device != device and w.device.type != "cpu":
            raise ValueError(f"inputs.masks[{m!r}] is on {w.device} but the data is on {device}; move it there")
        if w.dtype != torch.bool and w.device.type == "cpu" and not _compiling():
            bad = torch.nonzero((w != 0) & (w != 1)).flatten().tolist()
            if bad:
                raise ValueError(
                    f"inputs.masks[{m!r}] must hold only 0 and 1 (or be bool), got {w[bad[0]].item()!r} at "
                    f"sample(s) {bad[:20]}; a mask says observed (1) or missing (0), it is not a weight"
                )
        elif w.dtype != torch.bool:  # no host sync here: checked on the device (works in graphs too)
            torch._assert_async(((w == 0) | (w == 1)).all(),
                                f"inputs.masks[{m!r}] must hold only 0 and 1 (or be bool); a mask says observed "
                                "(1) or missing (0), it is not a weight")
        out_masks[m] = w if w.dtype == torch.bool else w != 0

    if check_empty and all(w.device.type == "cpu" for w in out_masks.values()) and not _compiling():
        seen = torch.stack(list(out_masks.values())).any(0)
        if not bool(seen.all()):
            empty = torch.nonzero(~seen).flatten().tolist()
            raise ValueError(
                f"sample(s) {empty[:20]}{'...' if len(empty) > 20 else ''} have no observed modality: "
                "their joint posterior is undefined. Drop them or observe at least one modality."
            )
    out_masks = {m: w.to(device, non_blocking=True) for m, w in out_masks.items()}
    data = {m: torch.where(_bcast(out_masks[m], data[m]), data[m], torch.zeros((), dtype=data[m].dtype, device=device))
            for m in names}
    return data, out_masks


def check_latent(z, latent_dim: int, what: str = "z") -> Tensor:
    """``z`` as a latent for decoders of ``latent_dim`` inputs: a floating tensor whose last dim is
    ``latent_dim`` (any leading shape); ``TypeError``/``ValueError`` otherwise, before any decoder runs."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of latents (..., latent_dim = {latent_dim}), got "
                        f"{type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor of latents, got {z.dtype}; cast it with .float()")
    if z.dim() < 1 or z.shape[-1] != latent_dim:
        raise ValueError(f"{what} must have latent_dim = {latent_dim} as its last dim, got shape {tuple(z.shape)}; "
                         "decode latents drawn by this model (encode, generate_from_prior)")
    return z


def _is_scalar(w) -> bool:
    """A 0-d mask: a 0-d tensor, a Python/numpy bool or number, a 0-d array (as in a hand-made item)."""
    if isinstance(w, Tensor):
        return w.dim() == 0
    return isinstance(w, (bool, numbers.Number)) or getattr(w, "ndim", None) == 0  # numpy scalars, 0-d arrays


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _bcast(w: Tensor, x: Tensor) -> Tensor:
    return w.reshape(w.shape[0], *([1] * (x.dim() - 1)))


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def stack_masks(masks: Optional[dict], names) -> Optional[Tensor]:
    """(M, B) bool from a dict of (B,) masks, or None."""
    if masks is None:
        return None
    return torch.stack([masks[m] for m in names])
