"""Saving and loading (issue 16; the saving tests of issue 9 moved here): a folder is data, not code; a save is
all or nothing at every instant, wherever MultiVae's save works; every damaged file is named. Tests that failed
before their fix say so in their docstring."""

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import stat
import tempfile
import threading
import traceback
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import crmvae_fast as cf
from crmvae_fast import persistence
from crmvae_fast.nn import ModelOutput
from crmvae_fast.persistence import CorruptFolderError, load_data_file
from test_reliability import Encoder  # a custom encoder: the save pickles it to encoders.pkl

DIMS = {"a": (4,), "b": (3,)}
UNPICKLES = "ignore:loading .* unpickles its custom architectures"


class Decoder(nn.Module):
    """A custom decoder, so the save pickles the decoders to decoders.pkl."""

    def __init__(self, n_out, latent=2):
        super().__init__()
        self.lin = nn.Linear(latent, n_out)

    def forward(self, z):
        return ModelOutput(reconstruction=self.lin(z))


def make_model(seed=0, fast=False, beta=2.5, custom_decoders=False, default=False):
    torch.manual_seed(seed)
    cfg = cf.CRMVAEConfig(n_modalities=2, latent_dim=2, input_dims=DIMS, beta=beta)
    if default:
        return cf.CRMVAE(cfg, fast_kernels=fast)
    decoders = {m: Decoder(d[0]) for m, d in DIMS.items()} if custom_decoders else None
    return cf.CRMVAE(cfg, encoders={m: Encoder(d[0]) for m, d in DIMS.items()}, decoders=decoders, fast_kernels=fast)


def assert_same_weights(model, other):
    assert list(model.state_dict()) == list(other.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0, msg=k)


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _rewrite_manifest(folder, name):
    """Record ``name``'s present bytes in the side file, as an attacker who edits a folder would."""
    side = json.loads((folder / persistence.SIDE_FILE).read_text())
    data = (folder / name).read_bytes()
    side["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / persistence.SIDE_FILE).write_text(json.dumps(side))


class Payload:
    """Unpickling this runs code: it creates the file ``flag``."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return exec, (f"open({self.flag!r}, 'w').close()",)


# --------------------------------------------------------------------------------------------- safe loading
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_model_pt_does_not_run(tmp_path, writer):
    """Before: model.pt was loaded with weights_only=False, so the payload ran (the flag file appeared)."""
    folder, flag = tmp_path / "m", tmp_path / "flag"
    make_model().save(folder)
    if writer == "torch.save":
        torch.save({"model_state_dict": Payload(flag)}, folder / "model.pt")
    else:
        (folder / "model.pt").write_bytes(pickle.dumps({"model_state_dict": Payload(flag)}, protocol=2))
    _rewrite_manifest(folder, "model.pt")  # a consistent manifest: the safe load is what refuses it
    with pytest.raises(CorruptFolderError, match=r"model\.pt: it holds objects other than tensors, or pickle "
                                                 r"instructions a safe load refuses to run \((builtins\.)?exec\)"):
        cf.CRMVAE.load_from_folder(folder)
    assert not flag.exists()


def test_a_pkl_beside_default_architectures_is_never_opened(tmp_path):
    folder, flag = tmp_path / "m", tmp_path / "flag"
    model = make_model(default=True)
    model.save(folder)
    for archi in ("encoders", "decoders"):
        (folder / f"{archi}.pkl").write_bytes(pickle.dumps(Payload(flag)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unpickling warning either
        back = cf.CRMVAE.load_from_folder(folder)
    assert not flag.exists()
    assert_same_weights(model, back)


def test_custom_architectures_unpickle_with_a_warning_once_per_folder(tmp_path):
    """Before: encoders.pkl was unpickled silently."""
    for name in ("m1", "m2"):
        make_model().save(tmp_path / name)
    with pytest.warns(UserWarning, match=r"m1 unpickles its custom architectures .*runs code from the folder: load "
                                         r"only folders you trust, or pass encoders=/decoders="):
        cf.CRMVAE.load_from_folder(tmp_path / "m1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.CRMVAE.load_from_folder(tmp_path / "m1")  # once per folder
    with pytest.warns(UserWarning, match="m2 unpickles"):
        cf.CRMVAE.load_from_folder(tmp_path / "m2")


def test_modules_given_in_code_replace_the_pickles(tmp_path):
    """Before: load_from_folder took no encoders=/decoders= and always unpickled."""
    folder, flag = tmp_path / "m", tmp_path / "flag"
    model = make_model(custom_decoders=True)
    model.save(folder)
    for archi in ("encoders", "decoders"):
        (folder / f"{archi}.pkl").write_bytes(pickle.dumps(Payload(flag)))
    torch.manual_seed(5)
    encoders = {m: Encoder(d[0]) for m, d in DIMS.items()}
    decoders = nn.ModuleDict({m: Decoder(d[0]) for m, d in DIMS.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = cf.CRMVAE.load_from_folder(folder, encoders=encoders, decoders=decoders)
    assert not flag.exists()
    assert_same_weights(model, back)
    assert back.encoders["a"] is encoders["a"] and back.model_config.beta == model.model_config.beta


def test_modules_given_in_code_that_do_not_fit_are_named(tmp_path):
    folder = tmp_path / "m"
    make_model(custom_decoders=True).save(folder)
    decoders = {m: Decoder(d[0]) for m, d in DIMS.items()}
    with pytest.raises(ValueError, match=r"the encoders given to load_from_folder name \['a'\], but .*model\.pt "
                                         r"holds encoders for \['a', 'b'\]"):
        cf.CRMVAE.load_from_folder(folder, encoders={"a": Encoder(4)}, decoders=decoders)
    wide = {m: Encoder(d[0], latent=3) for m, d in DIMS.items()}
    with pytest.raises(CorruptFolderError, match=r"model\.pt: its weights do not fit the model built from the given "
                                                 r"encoders and decoders: shapes saved vs built "
                                                 r"\['encoders\.a\.lin\.weight \(4, 4\) "
                                                 r"vs \(6, 4\)'"):
        cf.CRMVAE.load_from_folder(folder, encoders=wide, decoders=decoders)
    with pytest.raises(TypeError, match="encoders must be a dict modality name -> nn.Module"):
        cf.CRMVAE.load_from_folder(folder, encoders=[Encoder(4)])
    with pytest.raises(TypeError, match=r"decoders must map modality names to nn.Module, got \{'a': 'str'\}"):
        cf.CRMVAE.load_from_folder(folder, decoders={"a": "nope"})
    with pytest.raises(TypeError, match="fast_kernels must be True, False or None"):
        cf.CRMVAE.load_from_folder(folder, fast_kernels="yes")


# ------------------------------------------------------------------------------------------ all or nothing
#: The os calls a save changes the filesystem with (open() for writing is followed by fsync).
MUTATING = ("mkdir", "rename", "replace", "remove", "unlink", "rmdir", "link", "fsync", "chmod")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child mid-save; no os.fork here")


def _killed_after(k, fn) -> bool:
    """Run ``fn`` in a forked child that SIGKILLs itself right after its k-th filesystem change; True if it was
    killed there, False if ``fn`` finished first."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            count = [0]
            for name in MUTATING:
                def counted(*args, _real=getattr(os, name), **kwargs):
                    out = _real(*args, **kwargs)
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out
                setattr(os, name, counted)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the save failed in the child (its traceback is in the captured output)"
    return False


def _no_sibling(monkeypatch, parent):
    """A parent folder where no sibling folder can be made (as a parent that is not writable: root here bypasses
    permissions, so the refusal is simulated)."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        path = os.fspath(path)
        if os.path.dirname(os.path.abspath(path)) == str(parent) and os.path.basename(path).startswith("."):
            raise PermissionError(errno.EACCES, "Permission denied (simulated)", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@needs_fork
@pytest.mark.filterwarnings(UNPICKLES)
@pytest.mark.parametrize("strategy", ["swap", "in_place"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_model(tmp_path, monkeypatch, strategy):
    """Kill a child after each filesystem change of a save: the folder loads as exactly the old or exactly the new
    model (config, weights, fast_kernels), and the next save cleans up and loads. Before: the files were replaced
    one by one, so a kill between two replaces loaded the new weights under the old config; and where no sibling
    folder could be made the save failed."""
    parent = tmp_path / "p"
    parent.mkdir()
    folder = parent / "m"
    if strategy == "in_place":
        _no_sibling(monkeypatch, parent)
    old, new, third = make_model(0, False, 1.0), make_model(1, True, 2.0), make_model(2, False, 3.0)
    by_beta = {m.model_config.beta: m for m in (old, new, third)}
    seen = set()
    for k in range(1, 200):
        if folder.exists():
            shutil.rmtree(folder)
        assert old.save(folder) == strategy
        (folder / "training_config.json").write_text("{}")  # another program's file in the folder
        killed = _killed_after(k, lambda: new.save(folder))

        back = cf.CRMVAE.load_from_folder(folder)
        want = by_beta[back.model_config.beta]
        assert want is not third
        seen.add(want.model_config.beta)
        assert_same_weights(want, back)
        assert back.fast_kernels is want.fast_kernels

        assert third.save(folder) == strategy
        again = cf.CRMVAE.load_from_folder(folder)
        assert_same_weights(third, again)
        assert os.listdir(parent) == ["m"]  # nothing left beside the folder, nothing staged inside
        assert sorted(os.listdir(folder)) == sorted(["crmvae_fast.json", "environment.json", "encoders.pkl",
                                                     "model.pt", "model_config.json", "training_config.json"])
        assert (folder / "training_config.json").read_text() == "{}"
        if not killed:
            break
    assert k > 5 and seen == {1.0, 2.0}  # the kills covered the whole save, before and after it took effect


def test_a_symlinked_folder_on_another_filesystem_is_saved_where_it_points(tmp_path, monkeypatch):
    """Before: the save wrote a sibling of the link and moved files across it: 'Invalid cross-device link'."""
    other = tmp_path / "other"  # the other filesystem: no rename into or out of it
    (other / "real").mkdir(parents=True)
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "m"
    link.symlink_to(other / "real", target_is_directory=True)

    def across(real):
        def move(src, dst, **kwargs):
            inside = [os.path.realpath(p).startswith(str(other) + os.sep) for p in (src, dst)]
            if inside[0] != inside[1]:
                raise OSError(errno.EXDEV, "Invalid cross-device link (simulated)", src)
            return real(src, dst, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", across(os.rename))
    monkeypatch.setattr(os, "replace", across(os.replace))
    model = make_model(default=True)
    for _ in range(2):  # into the empty folder, then over the first save
        assert model.save(link) == "swap"
    assert link.is_symlink() and os.listdir(tmp_path / "links") == ["m"]
    assert_same_weights(model, cf.CRMVAE.load_from_folder(link))
    assert_same_weights(model, cf.CRMVAE.load_from_folder(other / "real"))


@pytest.mark.filterwarnings(UNPICKLES)
def test_a_folder_that_cannot_be_moved_is_saved_in_place(tmp_path, monkeypatch):
    """A folder on another filesystem than its parent (a mount point): no folder can be renamed, so the files are
    written inside it behind the completion marker; MultiVae still reads the folder."""
    real = os.rename

    def rename(src, dst, **kwargs):
        if os.path.isdir(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link (simulated)", src)
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    folder = tmp_path / "m"
    assert make_model(0).save(folder) == "in_place"  # a new folder too
    (folder / "training_config.json").write_text("{}")
    model = make_model(1, beta=1.5, default=True)  # MultiVae takes only its own BaseEncoder as a custom encoder
    assert model.save(folder) == "in_place"
    assert sorted(os.listdir(tmp_path)) == ["m"] and (folder / "training_config.json").read_text() == "{}"
    assert not (folder / "encoders.pkl").exists()  # the old save's custom encoders, no longer the model's
    assert_same_weights(model, cf.CRMVAE.load_from_folder(folder))
    models = pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is the outside witness")
    assert models.CRMVAE.load_from_folder(str(folder)).model_config.beta == 1.5


def test_a_folder_whose_parent_is_not_writable_is_saved_in_place(tmp_path, monkeypatch):
    """Before: the save made its temporary folder beside the target and failed with PermissionError."""
    folder = tmp_path / "m"
    make_model(0, default=True).save(folder)
    _no_sibling(monkeypatch, tmp_path)
    model = make_model(1, default=True)
    assert model.save(folder) == "in_place"
    assert_same_weights(model, cf.CRMVAE.load_from_folder(folder))
    assert os.listdir(tmp_path) == ["m"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a 0o555 folder anyway (the simulated test above covers it); run it "
                           "unprivileged, e.g. unshare -U python -m pytest --basetemp=/tmp/x -k read_only")
@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_folder_whose_parent_is_read_only_is_saved_in_place(tmp_path):
    parent = tmp_path / "p"
    parent.mkdir()
    make_model(0, default=True).save(parent / "m")
    parent.chmod(0o555)
    try:
        model = make_model(1, default=True)
        assert model.save(parent / "m") == "in_place"
        assert_same_weights(model, cf.CRMVAE.load_from_folder(parent / "m"))
        with pytest.raises(PermissionError, match=r"cannot save into .*new: cannot write into"):
            model.save(parent / "new")
    finally:
        parent.chmod(0o755)


# ---------------------------------------------------------------------------- a failed save changes nothing
@pytest.mark.filterwarnings(UNPICKLES)
def test_failed_save_leaves_the_previous_save_loadable(tmp_path):
    """Before (issue 9): a save failing half-way (an encoder that cannot be pickled) had already overwritten
    model.pt and truncated encoders.pkl, so the previous, good save no longer loaded."""
    model = make_model()
    folder = tmp_path / "model"
    model.save(folder)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.encoders["a"].lock = threading.Lock()  # cannot be pickled
    with pytest.raises(TypeError, match="cannot save: the custom encoders cannot be pickled .*lock"):
        model.save(folder)

    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before  # not one byte changed
    back = cf.CRMVAE.load_from_folder(folder, fast_kernels=False)
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, good[k], rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the temporary folder is gone


def test_failed_first_save_leaves_no_folder(tmp_path):
    model = make_model()
    model.encoders["b"].lock = threading.Lock()
    with pytest.raises(TypeError, match="pickle"):
        model.save(tmp_path / "new")
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings(UNPICKLES)
def test_save_replaces_an_older_save_and_keeps_other_files(tmp_path):
    folder = tmp_path / "model"
    make_model().save(folder)
    (folder / "training_config.json").write_text("{}")  # e.g. written by MultiVae's trainer beside the model
    (folder / "samples").mkdir()
    (folder / "samples" / "0.png").write_bytes(b"png")
    model = make_model(default=True)  # no custom encoders now: the old encoders.pkl goes
    model.save(folder)
    back = cf.CRMVAE.load_from_folder(folder, fast_kernels=False)
    assert_same_weights(model, back)
    assert (folder / "training_config.json").read_text() == "{}"
    assert (folder / "samples" / "0.png").read_bytes() == b"png"
    assert not (folder / "encoders.pkl").exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_new_save_folder_has_the_usual_mode(tmp_path):
    folder = tmp_path / "model"
    make_model().save(folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~_umask()


# ------------------------------------------------------------------------------------- bad input at save time
def test_save_into_a_file_path_is_a_clear_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="it is a file, expected a folder"):
        make_model().save(path)
    assert path.read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["file"]


def test_save_with_a_bad_path_is_one_clear_sentence(tmp_path):
    """Before: 3 and None reached os.path with its own words, '' saved into the working folder's parent."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"cannot save into .*file/m: a part of its parent path .* is a file"):
        make_model().save(tmp_path / "file" / "m")
    for bad in (3, None):
        with pytest.raises(TypeError, match=r"cannot save into .*: expected the folder as a str or os.PathLike, got"):
            make_model().save(bad)
    with pytest.raises(ValueError, match="cannot save into an empty path: expected the path of a folder"):
        make_model().save("")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# ------------------------------------------------------------------------------------ damaged files, named
def _damage(folder, kind):
    """Damage a saved folder; returns the file the error must name."""
    p = lambda name: folder / name  # noqa: E731
    if kind == "truncated model.pt":
        data = p("model.pt").read_bytes()
        p("model.pt").write_bytes(data[: len(data) // 2])
        return "model.pt"
    if kind == "empty model.pt":
        p("model.pt").write_bytes(b"")
        return "model.pt"
    if kind == "garbage model.pt":
        p("model.pt").write_bytes(b"\x00garbage" * 10)
        return "model.pt"
    if kind == "cut model_config.json":
        p("model_config.json").write_text(p("model_config.json").read_text()[:20])
        return "model_config.json"
    if kind == "model_config.json a list":
        p("model_config.json").write_text("[1, 2]")
        return "model_config.json"
    if kind == "model_config.json unknown field":
        cfg = json.loads(p("model_config.json").read_text())
        p("model_config.json").write_text(json.dumps({**cfg, "alpha": 1}))
        return "model_config.json"
    if kind == "cut crmvae_fast.json":
        if not p("crmvae_fast.json").exists():
            p("crmvae_fast.json").write_text('{"fast_kern')
        p("crmvae_fast.json").write_text(p("crmvae_fast.json").read_text()[:15])
        return "crmvae_fast.json"
    if kind == "cut environment.json":
        p("environment.json").write_text(p("environment.json").read_text()[:10])
        return "environment.json"
    if kind == "missing model.pt":
        p("model.pt").unlink()
        return "model.pt"
    if kind == "missing model_config.json":
        p("model_config.json").unlink()
        return "model_config.json"
    if kind == "missing encoders.pkl":
        p("encoders.pkl").unlink()
        return "encoders.pkl"
    if kind == "garbage encoders.pkl":
        p("encoders.pkl").write_bytes(b"\x80\x04garbage")
        return "encoders.pkl"
    if kind == "model.pt in place of the config":
        shutil.copy(p("model.pt"), p("model_config.json"))
        return "model_config.json"
    if kind == "the config in place of model.pt":
        shutil.copy(p("model_config.json"), p("model.pt"))
        return "model.pt"
    raise AssertionError(kind)


DAMAGES = ["truncated model.pt", "empty model.pt", "garbage model.pt", "cut model_config.json",
           "model_config.json a list", "model_config.json unknown field", "cut crmvae_fast.json",
           "cut environment.json", "missing model.pt", "missing model_config.json", "missing encoders.pkl",
           "garbage encoders.pkl", "model.pt in place of the config", "the config in place of model.pt"]


@pytest.mark.filterwarnings(UNPICKLES)
@pytest.mark.parametrize("manifest", [True, False], ids=["ours", "no-manifest"])
@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_file_is_named(tmp_path, kind, manifest):
    """Before: a truncated model.pt gave 'OSError: [Errno 22] Invalid argument', an empty one 'EOFError: Ran out of
    input', a cut crmvae_fast.json a bare JSONDecodeError, naming no file."""
    folder = tmp_path / "m"
    make_model().save(folder)
    if not manifest:
        (folder / "crmvae_fast.json").unlink()  # as MultiVae writes it: nothing to check the files against
    name = _damage(folder, kind)
    with pytest.raises((CorruptFolderError, FileNotFoundError)) as info:
        cf.CRMVAE.load_from_folder(folder)
    message = str(info.value)
    assert str(folder / name) in message, message
    assert ("; " in message) and ("save the model again" in message or "pass " in message
                                  or "give " in message or "delete " in message), message
    if manifest and name != "crmvae_fast.json" and not kind.startswith("missing"):
        assert re.search(r"(has \d+ bytes where|its sha256 differs from the one) crmvae_fast\.json recorded", message)
    elif kind.startswith("missing"):
        assert type(info.value) is FileNotFoundError and "is missing" in message


@pytest.mark.parametrize("case", ["missing key", "unexpected key", "wrong shape"])
def test_weights_that_do_not_fit_the_config_are_named(tmp_path, case):
    """Before: load_state_dict's RuntimeError, naming no file."""
    folder = tmp_path / "m"
    make_model(default=True).save(folder)
    (folder / "crmvae_fast.json").unlink()
    state = torch.load(folder / "model.pt", weights_only=True)["model_state_dict"]
    if case == "missing key":
        del state["encoders.a.embedding.bias"]
        want = r"missing keys \['encoders\.a\.embedding\.bias'\]"
    elif case == "unexpected key":
        state["encoders.c.lin.weight"] = torch.zeros(1)
        want = r"unexpected keys \['encoders\.c\.lin\.weight'\]"
    else:
        state["decoders.b.layers.1.0.weight"] = torch.zeros(3, 7)
        want = r"shapes saved vs built \['decoders\.b\.layers\.1\.0\.weight \(3, 7\) vs \(3, 512\)'\]"
    torch.save({"model_state_dict": state}, folder / "model.pt")
    with pytest.raises(CorruptFolderError, match=r"model\.pt: its weights do not fit the model built from "
                                                 r"model_config\.json: " + want):
        cf.CRMVAE.load_from_folder(folder)


def test_a_missing_folder_or_a_file_is_named(tmp_path):
    """Before: os.listdir's FileNotFoundError / NotADirectoryError."""
    with pytest.raises(FileNotFoundError, match=r"cannot load .*nowhere: no such folder; give the folder"):
        cf.CRMVAE.load_from_folder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"cannot load .*file: it is a file, expected the folder"):
        cf.CRMVAE.load_from_folder(tmp_path / "file")


def test_loading_another_multivae_models_folder_names_it(tmp_path):
    """Before (issue 9): loading an MVTCAE folder failed with "unexpected keyword argument 'alpha'"."""
    models = pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is the outside witness")
    cfg = models.MVTCAEConfig(n_modalities=2, latent_dim=2, input_dims=DIMS)
    models.MVTCAE(cfg).save(str(tmp_path / "mvtcae"))
    with pytest.raises(ValueError, match=r"holds a MVTCAE \(model_config.json names 'MVTCAEConfig'\), not a "
                                         r"CRMVAE; load it with multivae.models.MVTCAE.load_from_folder"):
        cf.CRMVAE.load_from_folder(tmp_path / "mvtcae")


def test_a_folder_multivae_rewrote_says_how_to_load_it(tmp_path):
    """MultiVae's save into one of our folders leaves our side file stale: the error says to delete it."""
    models = pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is the outside witness")
    folder = tmp_path / "m"
    make_model(default=True).save(folder)
    mv = models.CRMVAE.load_from_folder(str(folder))
    mv.model_config.beta = 0.5
    mv.save(str(folder))
    with pytest.raises(CorruptFolderError, match=r"model_config\.json: its sha256 differs from the one "
                                                 r"crmvae_fast\.json recorded .*MultiVae's save.*delete "
                                                 r"crmvae_fast\.json to load the folder unchecked"):
        cf.CRMVAE.load_from_folder(folder)
    (folder / "crmvae_fast.json").unlink()
    assert cf.CRMVAE.load_from_folder(folder).model_config.beta == 0.5


# ----------------------------------------------------------------------------------------------- the fuzz
FILES = ["model.pt", "model_config.json", "environment.json", "encoders.pkl", "decoders.pkl", "crmvae_fast.json"]
DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 1)),
    st.tuples(st.just("empty"), st.sampled_from(FILES)),
    st.tuples(st.just("swap"), st.sampled_from(FILES), st.sampled_from(FILES)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
)
#: Exactly what a load of a damaged folder may raise (ValueError: a config naming another MultiVae model).
ALLOWED = (CorruptFolderError, FileNotFoundError, ValueError)


def _apply(folder, op):
    kind, name = op[0], os.path.join(folder, op[1])
    if not os.path.exists(name):
        return
    if kind == "truncate":
        data = open(name, "rb").read()
        open(name, "wb").write(data[: int(len(data) * op[2])])
    elif kind == "empty":
        open(name, "wb").close()
    elif kind == "swap":
        other = os.path.join(folder, op[2])
        if os.path.exists(other) and other != name:
            os.rename(name, name + ".x")
            os.rename(other, name)
            os.rename(name + ".x", other)
    elif kind == "flip":
        data = bytearray(open(name, "rb").read())
        if data:
            data[min(len(data) - 1, int(len(data) * op[2]))] ^= op[3]
            open(name, "wb").write(bytes(data))
    else:
        os.remove(name)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two saved folders and their models: "ours", both architectures pickled, checked by the side file's
    manifest; "no-manifest", default architectures and no side file, as MultiVae writes them. (A damaged pickle
    that nothing checks is damaged code: unpickling it may do anything, a segfault included, so the unchecked
    folder has none.)"""
    base = tmp_path_factory.mktemp("pristine")
    ours, multivae = make_model(custom_decoders=True), make_model(default=True)
    ours.save(base / "ours")
    multivae.save(base / "no-manifest")
    (base / "no-manifest" / "crmvae_fast.json").unlink()
    return base, {"ours": ours, "no-manifest": multivae}


@pytest.mark.filterwarnings(UNPICKLES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flavor=st.sampled_from(["ours", "no-manifest"]), ops=st.lists(DAMAGE, min_size=1, max_size=3))
def test_fuzz_a_damaged_folder_loads_correctly_or_names_the_file(pristine, flavor, ops):
    # Without its side file "ours" would unpickle damaged pickles unchecked: "no-manifest" covers unchecked loads.
    assume(flavor != "ours" or ("delete", "crmvae_fast.json") not in ops)
    base, models = pristine
    model = models[flavor]
    work = tempfile.mkdtemp(dir=base)
    try:
        folder = os.path.join(work, "m")
        shutil.copytree(base / flavor, folder)
        for op in ops:
            _apply(folder, op)
        try:
            back = cf.CRMVAE.load_from_folder(folder)
        except ALLOWED as exc:
            assert type(exc) in ALLOWED, repr(exc)
            assert any(os.path.join(folder, f) in str(exc) for f in FILES), str(exc)
            return
        if flavor == "ours" and os.path.exists(os.path.join(folder, "crmvae_fast.json")):
            assert_same_weights(model, back)  # checked against the manifest: the saved model or an error
            assert back.model_config.to_dict() == model.model_config.to_dict()
        assert isinstance(back, cf.CRMVAE)
    finally:
        shutil.rmtree(work)


# ----------------------------------------------------------------------------------------------- data files
def test_load_data_file_reads_the_dict_format(tmp_path):
    """Before: evaluate --data unpickled the file with weights_only=False; there was no safe loader."""
    data = {"data": {"a": torch.rand(3, 4)}, "masks": {"a": torch.ones(3, dtype=torch.bool)}, "labels": torch.arange(3)}
    torch.save(data, tmp_path / "d.pt")
    back = load_data_file(tmp_path / "d.pt")
    assert back.keys() == data.keys() and torch.equal(back["data"]["a"], data["data"]["a"])


def test_load_data_file_reads_multivae_datasets(tmp_path):
    datasets = pytest.importorskip("multivae.data.datasets", reason="MultiVae 1.0.3's dataset classes")
    x = {"a": torch.rand(3, 4), "b": torch.rand(3, 2)}
    masks = {m: torch.tensor([True, False, True]) for m in x}
    for ds in (datasets.MultimodalBaseDataset(x, labels=torch.arange(3)), datasets.IncompleteDataset(x, masks)):
        torch.save(ds, tmp_path / "d.pt")
        back = load_data_file(str(tmp_path / "d.pt"))
        assert type(back) is type(ds) and torch.equal(back.data["b"], x["b"])


def test_load_data_file_runs_nothing_and_names_the_file(tmp_path):
    flag = tmp_path / "flag"
    torch.save({"data": {"a": Payload(flag)}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: it holds objects other than tensors, or pickle instructions a "
                                         r"safe load refuses to run \((builtins\.)?exec\); save the dataset as "
                                         r"torch.save\(\{'data'"):
        load_data_file(tmp_path / "evil.pt")
    assert not flag.exists()


@pytest.mark.parametrize("case", ["missing", "folder", "garbage", "empty", "no data", "a list", "numpy"])
def test_load_data_file_refuses_bad_files_in_one_sentence(tmp_path, case):
    path = tmp_path / "d.pt"
    if case == "folder":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"\x00not torch" * 5)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no data":
        torch.save({"x": torch.zeros(2)}, path)
    elif case == "a list":
        torch.save({"data": {"a": [1.0, 2.0]}}, path)
    elif case == "numpy":
        np = pytest.importorskip("numpy")
        torch.save({"data": {"a": np.zeros((2, 3))}}, path)
    error = FileNotFoundError if case == "missing" else ValueError
    with pytest.raises(error) as info:
        load_data_file(path)
    assert str(path) in str(info.value), str(info.value)
