"""The embedded synthetic dataset: shapes, mask invariants, determinism by seed, model-ready batches."""

import pytest
import torch

from crmvae_fast import synthetic


def test_shapes_and_dtypes():
    d = synthetic.make_dataset(37, seed=0)
    assert set(d) == {"data", "masks", "labels"}
    assert list(d["data"]) == list(synthetic.INPUT_DIMS)
    for m, shape in synthetic.INPUT_DIMS.items():
        assert d["data"][m].shape == (37, *shape)
        assert d["data"][m].dtype == torch.float32
        assert d["masks"][m].shape == (37,)
        assert d["masks"][m].dtype == torch.bool
    assert d["labels"].shape == (37,)


def test_value_ranges():
    d = synthetic.make_dataset(500, seed=3, missing_rate=0.0)
    img = d["data"]["image"]
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    label = d["data"]["label"]
    assert torch.equal(label.sum(-1), torch.ones(500))  # one-hot
    assert torch.equal(label.argmax(-1), d["labels"])
    assert torch.isfinite(d["data"]["vector"]).all()


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.9])
def test_no_sample_fully_missing(rate):
    d = synthetic.make_dataset(2000, seed=1, missing_rate=rate)
    seen = torch.stack(list(d["masks"].values())).any(0)
    assert bool(seen.all())
    if rate == 0.0:
        assert all(bool(w.all()) for w in d["masks"].values())
    else:
        frac = 1 - torch.stack(list(d["masks"].values())).float().mean().item()
        assert 0.0 < frac <= rate + 0.05  # rescued samples lower the missing fraction a little


def test_missing_entries_are_zero():
    d = synthetic.make_dataset(300, seed=2, missing_rate=0.4)
    for m, x in d["data"].items():
        missing = ~d["masks"][m]
        assert missing.any()
        assert float(x[missing].abs().sum()) == 0.0


def test_deterministic_by_seed():
    a = synthetic.make_dataset(64, seed=5)
    b = synthetic.make_dataset(64, seed=5)
    c = synthetic.make_dataset(64, seed=6)
    for m in synthetic.INPUT_DIMS:
        assert torch.equal(a["data"][m], b["data"][m])
        assert torch.equal(a["masks"][m], b["masks"][m])
    assert not torch.equal(a["data"]["vector"], c["data"]["vector"])


def test_modalities_share_a_cause():
    # The vector and the image are driven by one latent cause: they are correlated across samples.
    d = synthetic.make_dataset(2000, seed=0, missing_rate=0.0)
    v = d["data"]["vector"]
    img = d["data"]["image"].flatten(1)
    cv = (v - v.mean(0)) / v.std(0)
    ci = (img - img.mean(0)) / (img.std(0) + 1e-6)
    corr = (cv.T @ ci) / (len(v) - 1)
    assert corr.abs().max() > 0.3


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        synthetic.make_dataset(0)
    with pytest.raises(ValueError, match="missing_rate"):
        synthetic.make_dataset(10, missing_rate=1.0)


def test_batches_cover_everything_once():
    d = synthetic.make_dataset(70, seed=0)
    seen = []
    for batch in synthetic.batches(d, 32, shuffle=True, seed=1):
        assert set(batch) == {"data", "masks", "labels"}
        assert len(batch["labels"]) <= 32
        seen.append(batch["labels"])
    assert sum(len(s) for s in seen) == 70
    assert sorted(torch.cat(seen).tolist()) == sorted(d["labels"].tolist())
    assert sum(1 for _ in synthetic.batches(d, 32, drop_last=True)) == 2


def test_batches_feed_the_model(device):
    from crmvae_fast import CRMVAE, CRMVAEConfig

    torch.manual_seed(0)
    model = CRMVAE(CRMVAEConfig(**synthetic.model_config_kwargs(latent_dim=4))).to(device)
    d = synthetic.make_dataset(24, seed=0, missing_rate=0.3)
    batch = synthetic.to_device(next(synthetic.batches(d, 12)), device)
    out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    nll = model.compute_joint_nll({"data": batch["data"], "masks": batch["masks"]}, K=5, batch_size_K=5)
    assert torch.isfinite(nll)


def test_to_multivae():
    pytest.importorskip("multivae", reason="multivae is not installed: the MultiVae dataset view is not testable")
    d = synthetic.make_dataset(10, seed=0)
    ds = synthetic.to_multivae(d)
    assert len(ds) == 10
    assert torch.equal(ds.masks["image"], d["masks"]["image"])
    full = synthetic.to_multivae(synthetic.make_dataset(10, seed=0, missing_rate=0.0), with_masks=False)
    assert not hasattr(full, "masks")
