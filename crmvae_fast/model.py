"""``CRMVAE``: MultiVae 1.0.3's CRMVAE, number for number, with fused kernels for the latent math.

``fast_kernels=False`` runs the eager reference (:mod:`crmvae_fast.reference`) and draws its noise in the
same order and with the same calls as MultiVae, so a seeded run reproduces MultiVae's numbers. With
``fast_kernels=True`` the latent step runs as fused Triton kernels on CUDA tensors (and on CPU tensors through
the Triton interpreter when ``TRITON_INTERPRET=1``), and ``compute_joint_nll`` is batched over data points and
samples, with the C++/CUDA extension for the importance weights.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import persistence, reference
from .common import LatentStep, compute_dtype
from .config import CRMVAEConfig
from .inputs import as_count, check_latent, read_inputs, stack_masks
from .likelihoods import make_log_prob, summed_log_prob
from .nn import default_decoders, default_encoders, first_parameter, input_dtype, make_output, output_field, output_type

#: Most latent rows (data points x samples) that ``compute_joint_nll`` decodes at once on a GPU, and on a CPU
#: (smaller, so a block's activations stay in cache).
NLL_MAX_ROWS = 1 << 16
NLL_MAX_ROWS_CPU = 1 << 12
#: On a CPU the block is also sized by the bytes of the widest decoder output: at most this many bytes of it per
#: block (rows x features x element size), so the block's activations stay in cache (None: rows only).
NLL_CPU_BLOCK_BYTES = 1 << 20


class CRMVAE(nn.Module):
    """The CRMVAE model (Suzuki & Matsuo), a drop-in for ``multivae.models.CRMVAE``.

    Args:
        model_config: a :class:`CRMVAEConfig` (or MultiVae's ``CRMVAEConfig``).
        encoders: modality name -> ``nn.Module`` returning ``embedding`` and ``log_covariance`` (by key or
            attribute). Default: MultiVae's MLP encoders built from ``input_dims``.
        decoders: modality name -> ``nn.Module`` returning ``reconstruction``. Default: MultiVae's MLP decoders.
        fast_kernels: use the fused kernels (True) or the eager reference (False).

    Inputs (every method taking ``inputs``): see :func:`crmvae_fast.inputs.read_inputs`. Each modality is cast
    to the float dtype of its encoder's parameters (integer and bool data such as uint8 images, by value; float64
    or float16 data for a float32 model), on both paths; complex data is refused naming the modality; an encoder
    holding an ``nn.Embedding`` gets its data as given. Outputs are pythae's ``ModelOutput`` (a subclass of it)
    wherever pythae is importable, as in MultiVae, else :class:`crmvae_fast.nn.ModelOutput`; both give
    attribute, key and index access.

    With ``fast_kernels=True`` each decoder runs once per step on the concatenated latents ``[z_J; z_m]`` (2B
    rows) instead of twice on B rows. That gives the same numbers for decoders that treat rows independently;
    a decoder whose output depends on the batch (BatchNorm in training mode) must see each half alone: set
    ``model.concat_decoding = False`` (the default is False when a decoder holds a BatchNorm layer, else True).
    """

    def __init__(self, model_config, encoders: Optional[dict] = None, decoders: Optional[dict] = None,
                 fast_kernels: bool = True):
        nn.Module.__init__(self)  # not super(): a subclass may add MultiVae's BaseMultiVAE as a second base
        output_type()  # resolve the output class now (pythae's import is slow), not inside a compiled step
        model_config = CRMVAEConfig.from_any(model_config)
        self.model_name = "CRMVAE"
        self.model_config = model_config
        self.fast_kernels = fast_kernels
        self.n_modalities = model_config.n_modalities
        self.input_dims = model_config.input_dims
        self.latent_dim = model_config.latent_dim
        self.multiple_latent_spaces = False
        self.use_likelihood_rescaling = model_config.uses_likelihood_rescaling
        if self.input_dims is not None and len(self.input_dims) != self.n_modalities:
            raise ValueError(
                f"input_dims names {len(self.input_dims)} modalities but n_modalities is {self.n_modalities}"
            )
        if encoders is None:
            if self.input_dims is None:
                raise ValueError("give encoders, or input_dims in the model_config to build the default ones")
            encoders = default_encoders(self.input_dims, self.latent_dim)
        elif "encoders" not in model_config.custom_architectures:
            model_config.custom_architectures.append("encoders")
        if decoders is None:
            if self.input_dims is None:
                raise ValueError("give decoders, or input_dims in the model_config to build the default ones")
            decoders = default_decoders(self.input_dims, self.latent_dim)
        elif "decoders" not in model_config.custom_architectures:
            model_config.custom_architectures.append("decoders")
        if len(encoders) != self.n_modalities or len(decoders) != self.n_modalities:
            raise ValueError(
                f"expected {self.n_modalities} encoders and decoders (n_modalities), "
                f"got {len(encoders)} encoders and {len(decoders)} decoders"
            )
        if set(encoders) != set(decoders):
            raise ValueError(f"encoder names {list(encoders)} and decoder names {list(decoders)} differ")
        if self.input_dims is not None and set(self.input_dims) != set(encoders):
            raise ValueError(f"input_dims names {list(self.input_dims)} differ from encoder names {list(encoders)}")
        for kind, modules in (("encoder", encoders), ("decoder", decoders)):
            for m, module in modules.items():
                if not isinstance(module, nn.Module):
                    raise ValueError(f"the {kind} of modality {m!r} must be an nn.Module, got {type(module).__name__}")
        self.decoders = nn.ModuleDict({m: decoders[m] for m in decoders})
        self.encoders = nn.ModuleDict({m: encoders[m] for m in decoders})
        self.modalities_name = list(self.decoders.keys())
        self.concat_decoding = not any(isinstance(mod, nn.modules.batchnorm._BatchNorm)
                                       for mod in self.decoders.modules())
        model_config._validate(self.modalities_name)  # values set after the config was made, and the names
        self.rescale_factors = self._rescale_factors()
        if model_config.decoders_dist is None:
            model_config.decoders_dist = {m: "normal" for m in self.encoders}
        if model_config.decoder_dist_params is None:
            model_config.decoder_dist_params = {}
        self.recon_log_probs = {
            m: make_log_prob(d, model_config.decoder_dist_params.get(m, {}))
            for m, d in model_config.decoders_dist.items()
        }

    # ------------------------------------------------------------------------------------------------ set-up
    def _rescale_factors(self) -> dict:
        cfg = self.model_config
        if not self.use_likelihood_rescaling:
            return {m: 1 for m in self.encoders}
        if cfg.rescale_factors is not None:
            return {m: float(cfg.rescale_factors[m]) for m in self.modalities_name}
        if self.input_dims is None:
            raise ValueError(
                "uses_likelihood_rescaling=True needs rescale_factors or input_dims in the model_config"
            )
        sizes = {m: math.prod(d) for m, d in self.input_dims.items()}
        max_dim = max(sizes.values())
        return {m: max_dim / s for m, s in sizes.items()}

    @property
    def device(self) -> torch.device:
        """Where the parameters are (the value last assigned, or the CPU, for a model without parameters)."""
        p = first_parameter(self)
        if p is not None:
            return p.device
        return self.__dict__.get("_assigned_device") or torch.device("cpu")

    @device.setter
    def device(self, value) -> None:
        # MultiVae's trainer, evaluators and samplers do ``model.to(d); model.device = d``. The assignment is
        # accepted (and must name a device); moving the parameters stays the job of ``.to``.
        try:
            self.__dict__["_assigned_device"] = torch.device(value)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"model.device must name a torch device such as 'cpu' or 'cuda:0', got {value!r}") from e

    def update(self) -> None:
        """Called by MultiVae's trainer after each epoch; CRMVAE has nothing to update (as in MultiVae)."""

    def _read(self, inputs, **kwargs):
        """:func:`read_inputs` with each modality cast to its encoder's input dtype, on the parameters' device."""
        dtypes = {m: input_dtype(self.encoders[m]) for m in self.modalities_name}
        data, masks = read_inputs(inputs, self.modalities_name, self.input_dims, dtypes=dtypes, **kwargs)
        p = first_parameter(self)
        x = next(iter(data.values()))
        if p is not None and x.device != p.device:
            raise ValueError(f"the inputs are on {x.device} but the model's parameters on {p.device}; move one to "
                             "the other (batch.to(device) or model.to(device))")
        return data, masks

    # --------------------------------------------------------------------------------------------- latents
    def _encode_experts(self, data: dict, names) -> tuple[Tensor, Tensor]:
        """(M, B, D) means and log-variances of the experts of ``names``."""
        outs = [self.encoders[m](data[m]) for m in names]
        mus = [output_field(o, "embedding") for o in outs]
        lvs = [output_field(o, "log_covariance") for o in outs]
        expected = (next(iter(data.values())).shape[0], self.latent_dim)
        for m, mu_m, lv_m in zip(names, mus, lvs):
            if tuple(mu_m.shape) != expected or tuple(lv_m.shape) != expected:
                raise ValueError(
                    f"the encoder of {m!r} returned embedding {tuple(mu_m.shape)} and log_covariance "
                    f"{tuple(lv_m.shape)}, expected (B, latent_dim) = {expected}; check the data's shape (0-d "
                    "masks mark one unbatched item) or the encoder"
                )
        return torch.stack(mus), torch.stack(lvs)

    def _latent_step(self, mu: Tensor, lv: Tensor, mask: Optional[Tensor]) -> LatentStep:
        if self.fast_kernels:
            from . import ops

            return ops.latent_step(mu, lv, mask)
        return reference.latent_step(mu, lv, mask, *reference.draw_noise(mu))

    def _mean_latent_step(self, mu: Tensor, lv: Tensor, mask: Optional[Tensor]) -> LatentStep:
        """The latent step on zero noise: every sample is its posterior mean (``use_mean_embedding=True``)."""
        noise = (torch.zeros_like(mu[0]), torch.zeros_like(mu))
        if self.fast_kernels:
            from . import ops

            return ops.latent_step(mu, lv, mask, *noise)
        return reference.latent_step(mu, lv, mask, *noise)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, inputs, beta=None, use_mean_embedding: bool = False, **kwargs):
        """The CRMVAE loss (summed over the batch) and MultiVae's metrics.

        ``beta`` (a float or a 0-d tensor, e.g. a per-epoch KL weight) replaces ``model_config.beta`` for this
        call. ``use_mean_embedding=True`` reconstructs from the posterior means instead of samples (no noise is
        drawn); the KL terms do not depend on the samples. Other keyword arguments (``epoch``,
        ``dataset_size``, ``uses_ddp``, ``batch_ratio``, passed by MultiVae's trainer) are ignored. ``inputs``:
        read and cast as the class docstring says (integer, bool and other-float data cast to each encoder's
        dtype, complex refused; soft masks refused, on a GPU or under ``torch.compile`` by a device-side check).
        """
        if beta is None:
            beta = self.model_config.beta
        elif isinstance(beta, bool) or not (isinstance(beta, numbers.Real) or (
                isinstance(beta, Tensor) and beta.dim() == 0 and beta.is_floating_point())):
            raise TypeError(f"beta must be a float or a 0-d floating tensor (the KL weight of this call), got "
                            f"{beta!r}; pass None for model_config.beta")
        names = self.modalities_name
        data, masks = self._read(inputs)
        x = next(iter(data.values()))
        if isinstance(beta, Tensor) and beta.device not in (x.device, torch.device("cpu")):
            raise ValueError(f"beta is on {beta.device} but the data on {x.device}; move it there (or give a float)")
        mask = stack_masks(masks, names)
        mu, lv = self._encode_experts(data, names)
        lat = self._mean_latent_step(mu, lv, mask) if use_mean_embedding else self._latent_step(mu, lv, mask)
        M = self.n_modalities
        if self.fast_kernels:
            return self._loss_fused(data, masks, lat, beta)

        metrics = {"joint_divergence": lat.kl_prior.mean()}
        kl_experts = lat.kl_experts
        for i, m in enumerate(names):
            metrics[f"kl_{m}"] = kl_experts[i].mean()
        divergence = lat.kl_prior + kl_experts.sum(0)

        loss_rec = 0
        for i, m in enumerate(names):
            for source, z in (("joint", lat.z_J), (m, lat.z[i])):
                recon = output_field(self.decoders[m](z), "reconstruction")
                r = -summed_log_prob(self.recon_log_probs[m], recon, data[m]) * self.rescale_factors[m]
                if masks is not None:
                    r = torch.where(masks[m], r, torch.zeros((), dtype=r.dtype, device=r.device))
                loss_rec = loss_rec + r
                metrics[f"recon_{m}_from_{source}"] = r.mean()

        total = loss_rec / (2 * (M + 1)) + beta * divergence / (M + 1)
        loss = total.sum()
        return make_output(loss=loss, loss_sum=loss, metrics=metrics)

    def _neg_log_lik(self, m: str, recon, x, mask: Optional[Tensor], rescale, inner: int = 1) -> Tensor:
        """``where(mask, -rescale * sum_features log p(x | recon), 0)`` per recon row (recon rows against
        x rows as in :func:`ops.likelihood`): the fused op for the built-in distributions, the eager
        ``recon_log_probs`` (MultiVae's) for custom ones."""
        dist = self.model_config.decoders_dist[m]
        if (isinstance(dist, str) and isinstance(recon, Tensor) and isinstance(x, Tensor)
                and isinstance(rescale, (int, float))):
            from . import ops

            scale = self.model_config.decoder_dist_params.get(m, {}).get("scale", 1.0)
            return ops.likelihood(recon, x, dist, mask, scale=scale, rescale=float(rescale), inner=inner)
        n = x.shape[0]  # custom distribution: the two halves [z_J; z_m] scored as in the eager path
        r = torch.cat([-summed_log_prob(self.recon_log_probs[m], part, x) * rescale for part in recon.split(n)])
        if mask is not None:
            r = torch.where(mask.repeat(r.shape[0] // n), r, torch.zeros((), dtype=r.dtype, device=r.device))
        return r

    def _loss_fused(self, data: dict, masks: Optional[dict], lat: LatentStep, beta):
        """The loss and metrics of :meth:`forward` from the fused ops: one decoder call and one likelihood
        launch per modality, and the metrics and loss from one (1 + 3M, B) tensor of per-sample terms."""
        names, M = self.modalities_name, self.n_modalities
        B = lat.z_J.shape[0]
        if self.concat_decoding:  # M views of (2B, D): [z_J; z_m], one cat for all modalities
            zz = torch.cat([lat.z_J.expand(M, *lat.z_J.shape), lat.z], dim=1).unbind(0)
        recs = []
        for i, m in enumerate(names):
            mask_m = masks[m] if masks is not None else None
            parts = [zz[i]] if self.concat_decoding else [lat.z_J, lat.z[i]]
            for z in parts:  # rows: r_{m,J} then r_{m,m}
                recon = output_field(self.decoders[m](z), "reconstruction")
                recs.append(self._neg_log_lik(m, recon, data[m], mask_m, self.rescale_factors[m]))
        # rows of terms: KL_0, KL_m for every m, then r_{m,J}, r_{m,m} for every m
        rec = torch.cat(recs).reshape(2 * M, B)
        terms = torch.cat([lat.kl_prior[None], lat.kl_experts, rec.to(lat.kl_prior.dtype)])
        sums = terms.sum(1)
        means = sums / B
        metrics = {"joint_divergence": means[0]}
        for i, m in enumerate(names):
            metrics[f"kl_{m}"] = means[1 + i]
        for i, m in enumerate(names):
            metrics[f"recon_{m}_from_joint"] = means[1 + M + 2 * i]
            metrics[f"recon_{m}_from_{m}"] = means[2 + M + 2 * i]
        loss = sums[1 + M:].sum() / (2 * (M + 1)) + sums[:1 + M].sum() * (beta / (M + 1))
        return make_output(loss=loss, loss_sum=loss, metrics=metrics)

    # ---------------------------------------------------------------------------------- encode / decode
    def _cond_mod(self, cond_mod, what: str = "cond_mod") -> list:
        if isinstance(cond_mod, str):
            if cond_mod == "all":
                return list(self.encoders)
            if cond_mod in self.encoders:
                return [cond_mod]
            raise ValueError(f'{what} must be "all", a modality name or a list of them; got {cond_mod!r}')
        if not isinstance(cond_mod, (list, tuple)) or not all(isinstance(m, str) for m in cond_mod):
            raise TypeError(f'{what} must be "all", a modality name or a list of names of {list(self.encoders)}; '
                            f"got {cond_mod!r}")
        cond_mod = list(cond_mod)
        unknown = [m for m in cond_mod if m not in self.encoders]
        if unknown or not cond_mod:
            raise ValueError(f"{what} must name modalities of {list(self.encoders)}; got {cond_mod}")
        return cond_mod

    def encode(self, inputs, cond_mod: Union[list, str] = "all", N: int = 1, return_mean: bool = False,
               **kwargs):
        """Sample the joint posterior of the modalities ``cond_mod`` ("all", a name or a list).

        Returns ``z`` of shape (n, D) for N=1, (N, n, D) for N>1, (N*n, D) with ``flatten=True``, and
        ``one_latent_space=True``. With ``return_mean=True``, ``z`` is the posterior mean (repeated N times).
        Like MultiVae, incomplete inputs raise unless every sample has all of ``cond_mod`` or
        ``ignore_incomplete=True``; then missing experts are left out of the product. ``inputs`` are read and cast
        as the class docstring says; ``N`` is an int >= 1 (numpy integers too).
        """
        cond_mod = self._cond_mod(cond_mod)
        flatten = kwargs.pop("flatten", False)
        ignore_incomplete = kwargs.pop("ignore_incomplete", False)
        N = as_count(N, "N", "; N is the number of samples per data point")
        data, masks = self._read(inputs, require_all=False, check_empty=False)
        missing = [m for m in cond_mod if m not in data]
        if missing:
            raise ValueError(f"cond_mod names {missing}, which inputs.data lacks")
        mask = None
        if masks is not None:
            mask = stack_masks(masks, cond_mod)
            if not ignore_incomplete and not bool(mask.all()):
                raise ValueError(
                    f"some samples miss one of the modalities {cond_mod} they are encoded from; "
                    "pass ignore_incomplete=True to leave missing experts out of the product"
                )
        mu, lv = self._encode_experts(data, cond_mod)
        mu_J, lv_J = reference.poe(mu, lv, mask)
        if return_mean:
            z = torch.stack([mu_J] * N) if N > 1 else mu_J
        else:
            shape = (N, *mu_J.shape) if N > 1 else mu_J.shape
            z = mu_J + torch.empty(shape, dtype=mu_J.dtype, device=mu_J.device).normal_() * torch.exp(0.5 * lv_J)
        if N > 1 and flatten:
            z = z.reshape(-1, *z.shape[2:])
        return make_output(z=z, one_latent_space=True)

    def decode(self, embedding, modalities: Union[list, str] = "all"):
        """Decode ``embedding.z`` (latents of shape (..., latent_dim), floating; cast to each decoder's dtype) in
        ``modalities`` ("all", a name or a list). Puts the model in eval mode, like MultiVae."""
        modalities = self._cond_mod(modalities, "modalities")
        if isinstance(embedding, Tensor):
            raise TypeError("decode takes the output of encode or generate_from_prior (with a 'z' field), got a "
                            "tensor; pass {'z': z}")
        try:
            z = output_field(embedding, "z")
        except TypeError:
            raise TypeError(f"decode takes the output of encode or generate_from_prior (with a 'z' field), got "
                            f"{type(embedding).__name__}") from None
        z = check_latent(z, self.latent_dim, "embedding.z")
        p = first_parameter(self.decoders)
        if p is not None and z.device != p.device:
            raise ValueError(f"embedding.z is on {z.device} but the decoders' parameters on {p.device}; move it there")
        self.eval()
        with torch.no_grad():
            return make_output({m: output_field(self.decoders[m](_cast_to(z, self.decoders[m])), "reconstruction")
                                for m in modalities})

    def predict(self, inputs, cond_mod: Union[list, str] = "all", gen_mod: Union[list, str] = "all",
                N: int = 1, flatten: bool = False, **kwargs):
        """Generate ``gen_mod`` conditioned on ``cond_mod``: (n, ...) per modality, (N, n, ...) for N>1, or
        (N*n, ...) with ``flatten=True``. ``inputs`` are read and cast as the class docstring says."""
        self.eval()
        z = self.encode(inputs, cond_mod, N=N, flatten=True, **kwargs)
        output = self.decode(z, gen_mod)
        n_data = len(z.z) // N
        if not flatten and N > 1:
            for m in list(output):
                output[m] = output[m].reshape(N, n_data, *output[m].shape[1:])
        return output

    def generate_from_prior(self, n_samples: int, **kwargs):
        """``z ~ N(0, I)``: (n_samples, D), or (D,) for one sample (MultiVae's shapes). ``n_samples``: an int >= 1
        (numpy integers too)."""
        n_samples = as_count(n_samples, "n_samples", "; it is the number of latents to draw")
        shape = [n_samples, self.latent_dim] if n_samples > 1 else [self.latent_dim]
        return make_output(z=torch.empty(shape).normal_().to(self.device), one_latent_space=True)

    # ------------------------------------------------------------------------------------------- joint NLL
    @torch.no_grad()
    def compute_joint_nll(self, inputs, K: int = 1000, batch_size_K: int = 100) -> Tensor:
        """Importance-sampled ``-sum_i log p(X_i)`` with K samples of the joint posterior per point (0-d).

        Incomplete data is supported: the joint is the product of the observed experts and only observed
        modalities enter ``log p(x | z)``. ``batch_size_K`` bounds the samples decoded at once per data point;
        the answer does not depend on it. Both paths draw and decode a bounded number of latents at a time, so
        memory does not grow with K x n. ``inputs`` are read and cast as the class docstring says; ``K`` and
        ``batch_size_K`` are ints >= 1 (numpy integers too).
        """
        K = as_count(K, "K", "; K is the number of importance samples per data point")
        batch_size_K = as_count(batch_size_K, "batch_size_K", "; it bounds the samples decoded at once")
        self.eval()
        names = self.modalities_name
        data, masks = self._read(inputs)
        mu, lv = self._encode_experts(data, names)
        mu_J, lv_J = reference.poe(mu, lv, stack_masks(masks, names))
        if self.fast_kernels:
            return -self._joint_ll_batched(data, masks, mu_J, lv_J, K, batch_size_K).sum()
        return -self._joint_ll_per_point(data, masks, mu_J, lv_J, K, batch_size_K).sum()

    def _log_px(self, z: Tensor, data: dict, masks: Optional[dict], idx: slice, names=None) -> Tensor:
        """``sum_m log p(x_m[idx] | z)`` over ``names`` (default: every modality) for z of shape (n, k, D):
        (n, k), observed modalities only."""
        n, k, D = z.shape
        total = 0
        for m in names or self.modalities_name:
            recon = output_field(self.decoders[m](z.reshape(n * k, D)), "reconstruction")
            dist = self.model_config.decoders_dist[m]
            if self.fast_kernels and isinstance(dist, str) and isinstance(recon, Tensor):
                # the fused kernel on a GPU; on a CPU its eager twin (the Triton interpreter is for tests)
                from . import ops

                lik = ops.likelihood if recon.is_cuda else reference.neg_log_likelihood
                scale = self.model_config.decoder_dist_params.get(m, {}).get("scale", 1.0)
                mask_m = masks[m][idx] if masks is not None else None
                total = total + lik(recon, data[m][idx], dist, mask_m, scale, -1.0, k).reshape(n, k)
                continue
            recon = recon.reshape(n, k, *recon.shape[1:])
            x = data[m][idx].unsqueeze(1)
            lp = summed_log_prob(self.recon_log_probs[m], recon, x, n_batch_dims=2)
            if masks is not None:
                lp = torch.where(masks[m][idx, None], lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
            total = total + lp
        return total

    def _joint_ll_per_point(self, data, masks, mu_J, lv_J, K, batch_size_K, max_rows: Optional[int] = None) -> Tensor:
        """MultiVae's estimator on MultiVae's draws: its one (K, n, D) standard normal draw (latent row
        ``k * n + i`` is sample k of point i) is made here in slices of at most ``max_rows`` latents and at most
        ``batch_size_K`` samples per point (default row budget: as :meth:`_posterior_blocks`), so memory does not
        grow with K x n. On the CPU consecutive slices of a draw give the numbers of the whole draw (the
        generator fills blocks of 16 values; every slice but the last is a whole number of blocks and the last
        has at least 16 values), so a seeded run reproduces MultiVae's samples; on a GPU the slices are other
        draws of the same distribution. Each slice is decoded at once and its importance weights are folded
        into a running log-sum-exp per point. (n,)."""
        n, D = mu_J.shape
        if max_rows is None:
            max_rows = NLL_MAX_ROWS if mu_J.is_cuda else _cpu_block_rows(data)
        step = 16 // math.gcd(D, 16) if D else 1  # rows per whole number of 16-value blocks
        rows = min(max_rows, batch_size_K * n)
        rows = max(step, rows - rows % step)
        total = K * n
        bounds = list(range(0, total, rows)) + [total]
        if len(bounds) > 2 and (total - bounds[-2]) * D < 16:
            del bounds[-2]  # the last slice takes the short tail with it
        std = torch.exp(0.5 * lv_J)
        ct = compute_dtype(mu_J.dtype)
        run_max = torch.full((n,), -math.inf, dtype=ct, device=mu_J.device)
        run_sum = torch.zeros((n,), dtype=ct, device=mu_J.device)
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            i = torch.arange(r0, r1, device=mu_J.device) % n  # the point of each latent row
            eps = torch.empty((r1 - r0, D), dtype=mu_J.dtype, device=mu_J.device).normal_()
            z = (mu_J[i] + eps * std[i]).unsqueeze(1)  # (rows, 1, D)
            rows_data = {m: x[i] for m, x in data.items()}
            rows_masks = None if masks is None else {m: w[i] for m, w in masks.items()}
            log_px = self._log_px(z, rows_data, rows_masks, slice(None))
            log_w = reference.importance_log_weights(log_px, z, mu_J[i], lv_J[i])[:, 0].to(ct)
            run_max, run_sum = _fold_log_weights(run_max, run_sum, log_w, i)
        return run_max + torch.log(run_sum) - math.log(K)

    def _posterior_blocks(self, data: dict, mu: Tensor, lv: Tensor, K: int, batch_size_K: int,
                          noise: Optional[Callable] = None, max_rows: Optional[int] = None):
        """K samples of ``N(mu, exp(lv))`` per point, by blocks of points: yields ``(i0, i1, chunks)``, where
        ``chunks`` yields the (i1 - i0, k, D) samples in chunks of ``k <= batch_size_K``, at most ``max_rows``
        latents at once (default: ``NLL_MAX_ROWS`` on a GPU, by the widest decoder output on a CPU).
        ``noise(k0, k1, i0, i1)`` returns the (k1-k0, i1-i0, D) standard normal draws of samples k0:k1 of points
        i0:i1 (default: fresh draws)."""
        n, D = mu.shape
        if max_rows is None:
            max_rows = NLL_MAX_ROWS if mu.is_cuda else _cpu_block_rows(data)
        kc = min(batch_size_K, K)
        nb = max(1, min(n, max_rows // kc))

        def chunks(i0, i1):
            mu_b, std_b = mu[i0:i1].unsqueeze(1), torch.exp(0.5 * lv[i0:i1]).unsqueeze(1)
            for k0 in range(0, K, kc):
                k1 = min(K, k0 + kc)
                if noise is None:
                    eps = torch.empty((i1 - i0, k1 - k0, D), dtype=mu.dtype, device=mu.device).normal_()
                else:
                    eps = noise(k0, k1, i0, i1).transpose(0, 1)
                yield (mu_b + eps * std_b).contiguous()

        for i0 in range(0, n, nb):
            i1 = min(n, i0 + nb)
            yield i0, i1, chunks(i0, i1)

    def _joint_ll_batched(self, data, masks, mu_J, lv_J, K, batch_size_K,
                          noise: Optional[Callable] = None, max_rows: Optional[int] = None) -> Tensor:
        """Blocks of points x chunks of samples (:meth:`_posterior_blocks`), the importance weights folded into
        a running log-sum-exp by ``ops.iw_lse_update``: (n,)."""
        from . import ops

        lls = []
        for i0, i1, chunks in self._posterior_blocks(data, mu_J, lv_J, K, batch_size_K, noise, max_rows):
            state = ops.iw_lse_init(i1 - i0, device=mu_J.device, dtype=compute_dtype(mu_J.dtype))
            for z in chunks:
                log_px = self._log_px(z, data, masks, slice(i0, i1))
                state = ops.iw_lse_update(log_px, z, mu_J[i0:i1], lv_J[i0:i1], *state)
            lls.append(ops.iw_lse_finalize(*state, K))
        return torch.cat(lls)

    # ------------------------------------------------------------------------------------- conditional NLL
    @torch.no_grad()
    def compute_cond_nll(self, inputs, cond_mod=None, gen_mod=None, K: Optional[int] = None,
                         batch_size_K: int = 100, *, subset=None, pred_mods=None, k_iwae=None,
                         reduction: str = "mean") -> dict:
        """Importance-sampled ``-log p(x_m | x_cond)`` for each ``m`` of ``gen_mod``, averaged over the points:
        MultiVae's ``compute_cond_nll(inputs, subset, pred_mods, k_iwae=1000)``, whose names and result format
        (a dict modality -> 0-d tensor) it also takes.

        For each point, K samples ``z_k ~ q(z | x_cond)`` (the product of the experts of ``cond_mod``) and
        ``ll_m = logsumexp_k log p(x_m | z_k) - log K``. Incomplete data is supported: the product takes the
        observed experts of ``cond_mod`` only, and the mean for ``m`` runs over the points where ``m`` and at
        least one modality of ``cond_mod`` are observed (MultiVae refuses incomplete inputs). With
        ``fast_kernels=True`` the points and samples are batched (``batch_size_K`` samples decoded at once per
        point; the answer does not depend on it) and folded by the importance-weight op; with
        ``fast_kernels=False`` it is MultiVae's loop, draw for draw.

        ``reduction="sum"`` returns the sum over those points instead of the mean (0 where no point qualifies),
        which is what a sum over a dataset of incomplete batches needs (:func:`crmvae_fast.evaluate_cond_nll`).
        ``inputs`` are read and cast as the class docstring says; ``K`` and ``batch_size_K`` are ints >= 1 (numpy
        integers too).
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f'reduction must be "mean" (MultiVae\'s) or "sum", got {reduction!r}')
        cond_mod = _alias("cond_mod", cond_mod, "subset", subset, None)
        gen_mod = _alias("gen_mod", gen_mod, "pred_mods", pred_mods, None)
        K = _alias("K", K, "k_iwae", k_iwae, 1000)
        if cond_mod is None or gen_mod is None:
            raise ValueError("compute_cond_nll needs cond_mod (alias subset) and gen_mod (alias pred_mods): "
                             "the modalities conditioned on and the ones scored, e.g. (inputs, ['img'], ['txt'])")
        K = as_count(K, "K (alias k_iwae)", "; K is the number of importance samples per data point")
        batch_size_K = as_count(batch_size_K, "batch_size_K", "; it bounds the samples decoded at once")
        cond = self._cond_mod(cond_mod)
        gen = self._cond_mod(gen_mod, "gen_mod")
        self.eval()
        data, masks = self._read(inputs, require_all=False, check_empty=False)
        missing = [m for m in dict.fromkeys(cond + gen) if m not in data]
        if missing:
            raise ValueError(f"cond_mod and gen_mod name {missing}, which inputs.data lacks")
        mask_c = stack_masks(masks, cond)
        mu, lv = self._encode_experts(data, cond)
        mu_c, lv_c = reference.poe(mu, lv, mask_c)
        if self.fast_kernels:
            ll = self._cond_ll_batched(data, gen, mu_c, lv_c, K, batch_size_K)
        else:
            ll = self._cond_ll_per_sample(data, gen, mu_c, lv_c, K)
        out = {}
        for j, m in enumerate(gen):
            if masks is None:
                out[m] = -ll[:, j].sum() / (ll.shape[0] if reduction == "mean" else 1)
                continue
            scored = masks[m] & mask_c.any(0)
            if reduction == "sum":
                out[m] = -torch.where(scored, ll[:, j], torch.zeros((), dtype=ll.dtype, device=ll.device)).sum()
                continue
            count = int(scored.sum())
            if count == 0:
                raise ValueError(f"no point observes {m!r} together with one of {cond}: nothing to score for {m!r}; "
                                 "leave it out of gen_mod or pass points that observe it")
            out[m] = -torch.where(scored, ll[:, j], torch.zeros((), dtype=ll.dtype, device=ll.device)).sum() / count
        return out

    def _cond_ll_per_sample(self, data, gen, mu_c, lv_c, K) -> Tensor:
        """MultiVae's algorithm: K times one (n, D) draw, decoded for all points. (n, len(gen))."""
        lps = []
        for _ in range(K):
            z = mu_c + torch.empty_like(mu_c).normal_() * torch.exp(0.5 * lv_c)
            lps.append(torch.stack([
                summed_log_prob(self.recon_log_probs[m], output_field(self.decoders[m](z), "reconstruction"),
                                data[m]) for m in gen], -1))
        return torch.logsumexp(torch.stack(lps), dim=0) - math.log(K)

    def _cond_ll_batched(self, data, gen, mu_c, lv_c, K, batch_size_K,
                         noise: Optional[Callable] = None, max_rows: Optional[int] = None) -> Tensor:
        """Blocks of points x chunks of samples (:meth:`_posterior_blocks`), ``log p(x_m | z)`` folded into a
        running log-sum-exp per (point, modality) by ``ops.iw_lse_update``: (n, len(gen)).

        The conditional estimator has no prior/posterior ratio. The op's log-weight is ``log_px + log N(z; 0, I)
        - log N(z; mu, exp(lv))`` summed over the latent dims, so it is fed a zero-width latent (D = 0): both
        Gaussian terms are empty sums, exactly 0, and the op folds ``log p(x_m | z)`` alone."""
        from . import ops

        P = len(gen)
        ct = compute_dtype(mu_c.dtype)
        lls = []
        for i0, i1, chunks in self._posterior_blocks(data, mu_c, lv_c, K, batch_size_K, noise, max_rows):
            rows = (i1 - i0) * P
            no_latent = torch.empty((rows, 0), dtype=ct, device=mu_c.device)
            state = ops.iw_lse_init(rows, device=mu_c.device, dtype=ct)
            for z in chunks:
                log_px = torch.stack([self._log_px(z, data, None, slice(i0, i1), [m]) for m in gen], 1)  # (nb, P, k)
                k = z.shape[1]
                z0 = torch.empty((rows, k, 0), dtype=ct, device=mu_c.device)
                state = ops.iw_lse_update(log_px.reshape(rows, k), z0, no_latent, no_latent, *state)
            lls.append(ops.iw_lse_finalize(*state, K).reshape(i1 - i0, P))
        return torch.cat(lls)

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, dir_path) -> str:
        """Save in MultiVae's folder format (``model_config.json``, ``environment.json``, ``model.pt``,
        ``encoders.pkl`` / ``decoders.pkl`` for custom architectures) plus this package's ``crmvae_fast.json``;
        MultiVae's ``load_from_folder`` reads it. All or nothing, keeping the folder's other files: returns
        ``"swap"`` or ``"in_place"``, the strategy that ran (:func:`crmvae_fast.persistence.save_model`)."""
        return persistence.save_model(self, dir_path)

    @classmethod
    def load_from_folder(cls, dir_path, fast_kernels: Optional[bool] = None, *, encoders: Optional[dict] = None,
                         decoders: Optional[dict] = None) -> "CRMVAE":
        """Load a folder written by :meth:`save` or by MultiVae's ``CRMVAE.save``; ``fast_kernels=None`` takes the
        saved value. ``model.pt`` loads with ``weights_only=True``; pickled architectures are unpickled (with a
        warning) only where the config lists them as custom, unless ``encoders`` / ``decoders`` give them in code.
        A damaged folder raises :class:`crmvae_fast.persistence.CorruptFolderError` naming the file
        (:func:`crmvae_fast.persistence.load_model`)."""
        return persistence.load_model(cls, dir_path, fast_kernels, encoders=encoders, decoders=decoders)


def _fold_log_weights(run_max: Tensor, run_sum: Tensor, log_w: Tensor, point: Tensor) -> tuple[Tensor, Tensor]:
    """Fold log-weights ``log_w`` (r,) of the points ``point`` (r,) into the running ``(max, sum of exp(log w -
    max))`` per point (n,), as ``ops.iw_lse_update`` does for rectangular chunks; an infinite max shifts by 0."""
    new_max = run_max.scatter_reduce(0, point, log_w, "amax")
    shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
    added = torch.zeros_like(run_sum).scatter_add(0, point, torch.exp(log_w - shift[point]))
    return new_max, run_sum * torch.exp(run_max - shift) + added


def _alias(name: str, value, alias: str, alias_value, default):
    """One argument that also goes by MultiVae's name (``subset`` for ``cond_mod``, ...)."""
    if value is not None and alias_value is not None:
        raise ValueError(f"give {name} or its MultiVae name {alias}, not both")
    if value is not None:
        return value
    return alias_value if alias_value is not None else default


def _cpu_block_rows(data: dict) -> int:
    """Latent rows ``compute_joint_nll`` decodes at once on a CPU: ``NLL_MAX_ROWS_CPU``, fewer when the widest
    decoder output (the width of the data, which the reconstruction has) would pass ``NLL_CPU_BLOCK_BYTES``."""
    if NLL_CPU_BLOCK_BYTES is None:
        return NLL_MAX_ROWS_CPU
    widths = [x[0].numel() * max(4, x.element_size()) for x in data.values() if isinstance(x, Tensor) and len(x)]
    return max(1, min(NLL_MAX_ROWS_CPU, NLL_CPU_BLOCK_BYTES // max(widths + [1])))


def _cast_to(z: Tensor, module: nn.Module) -> Tensor:
    """``z`` in the float dtype ``module`` takes (see :func:`input_dtype`)."""
    dtype = input_dtype(module)
    return z if dtype in (None, z.dtype) else z.to(dtype)
