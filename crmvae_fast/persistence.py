"""Saving and loading a CRMVAE folder (MultiVae 1.0.3's format), safely and all or nothing; and data files.

A saved folder holds MultiVae's files: ``model_config.json``, ``environment.json``, ``model.pt``
(``{"model_state_dict": ...}``) and, for custom architectures, ``encoders.pkl`` / ``decoders.pkl``; and this
package's side file ``crmvae_fast.json``, which MultiVae never opens: the saved ``fast_kernels``, the package
version, and a manifest (size and sha256 of every other file the save wrote).

**What loading executes.** ``model.pt`` and data files load with ``torch.load(weights_only=True)``: tensors and
plain containers only, so a crafted pickle in them is refused, not run. ``encoders.pkl`` / ``decoders.pkl`` are
code: they are unpickled only when ``model_config.json`` lists them in ``custom_architectures`` (as MultiVae
does), after their checksum is checked against the manifest, with a warning once per folder and process; a
``.pkl`` beside a config that says the architectures are the default ones is never opened, and
``load_model(..., encoders=..., decoders=...)`` loads a folder with custom architectures unpickling nothing.

**How a save is all or nothing.** Every file is serialized in memory first (an encoder that cannot be pickled
changes nothing on disk). Then one of two strategies, whose name :func:`save_model` returns:

- ``"swap"``: the new folder is written beside the target (``.<name>.crmvae-saving``), the target's other
  entries (e.g. MultiVae's ``training_config.json``) hard-linked (or copied) into it, the target renamed to
  ``.<name>.crmvae-replaced``, the new folder renamed into place, the old one deleted. A crash between the two
  renames leaves no target: :func:`load_model` then reads the complete new folder (or the old one), and the next
  save puts it in place.
- ``"in_place"`` where no sibling folder can be made or moved (a parent that is not writable, a folder that is a
  mount point or on another filesystem than its parent): the files are written to ``<target>/.crmvae_fast-saving``
  and its manifest is written last (the completion marker), then the files are moved into the target one by one,
  the manifest last. While the staging folder holds a manifest, :func:`load_model` reads each file from it or,
  once moved, from the target: the new model, whole; without one it reads the target: the old model, whole.
  (MultiVae's loader, which knows nothing of this, could see a mix if a crash cuts the moves.)

Either way a later save first finishes or discards what a crashed one left, under a lock on the parent folder
(``fcntl.flock``, where there is one), so at most these two sibling names and one staging folder ever exist.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import pickle
import re
import shutil
import stat
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .config import CRMVAEConfig

CONFIG, ENVIRONMENT, WEIGHTS = "model_config.json", "environment.json", "model.pt"
#: This package's own settings and the manifest. MultiVae reads only model_config.json, model.pt, the .pkl
#: files and environment.json, and its config parser refuses unknown fields, so they live in a file it never opens.
SIDE_FILE = "crmvae_fast.json"
ARCHITECTURES = ("encoders", "decoders")
#: Every file a save writes (or replaces, or removes when the new model no longer needs it).
MODEL_FILES = (ENVIRONMENT, CONFIG, WEIGHTS, "encoders.pkl", "decoders.pkl", SIDE_FILE)
#: The staging folder of an in-place save, inside the target folder.
STAGE = ".crmvae_fast-saving"

#: Folders whose pickled architectures this process already warned about.
_warned_unpickling: set = set()


class CorruptFolderError(ValueError):
    """A saved folder that cannot be loaded: a file is damaged, cut, of the wrong kind or does not fit the
    others. The message names the file, what is wrong with it and what to do; ``path`` is the file."""

    def __init__(self, path: str, problem: str, remedy: str):
        self.path = path
        super().__init__(f"{path}: {problem}; {remedy}")


# ----------------------------------------------------------------------------------------------------- saving
def save_model(model, dir_path) -> str:
    """Save ``model`` into the folder ``dir_path`` (created with its parents if missing) in MultiVae's format,
    all or nothing (see the module's docstring), keeping the folder's other files.

    Returns the strategy that ran: ``"swap"`` (the new folder was written beside and renamed into place) or
    ``"in_place"`` (written inside the folder behind a completion marker, where no sibling folder could be made
    or moved). A symlinked folder is saved into where the link points. Raises ``TypeError`` for a path that is
    not a str or ``os.PathLike`` or an architecture that cannot be pickled, ``ValueError`` for an empty path,
    ``NotADirectoryError`` for a path (or a parent) that is a file, and an ``OSError`` naming the folder where
    it cannot be written, before anything on disk changes."""
    path = _as_path(dir_path, "save into")
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"cannot save into {path}: it is a file, expected a folder; give the path of a "
                                 "folder (it is created if missing)")
    files = _serialize(model)
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise NotADirectoryError(f"cannot save into {path}: a part of its parent path {parent} is a file, expected "
                                 "folders; give a path under a folder") from exc
    except OSError as exc:
        raise type(exc)(f"cannot save into {path}: its parent folder {parent} cannot be created ({exc.strerror}); "
                        "give a path where you can write") from exc
    with _locked(parent):
        _recover(target)
        if _save_by_swap(target, files):
            return "swap"
        _save_in_place(target, files, path)
        return "in_place"


def _as_path(value, what: str, noun: str = "folder") -> str:
    """``value`` (str, bytes or ``os.PathLike``) as a non-empty str path, else one clear error."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise TypeError(f"cannot {what} {value!r}: expected the {noun} as a str or os.PathLike, got "
                        f"{type(value).__name__}")
    path = os.fspath(value)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError(f"cannot {what} an empty path: expected the path of a {noun}")
    return path


def _serialize(model) -> dict:
    """The folder's files as bytes, name -> content, the side file (with the manifest of the others) last."""
    from . import __version__

    config = model.model_config
    files = {ENVIRONMENT: json.dumps({"name": "EnvironmentConfig",
                                      "python_version": f"{sys.version_info[0]}.{sys.version_info[1]}"}).encode()}
    try:
        files[CONFIG] = json.dumps(config.to_dict()).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot save: model_config does not convert to JSON ({exc}); keep its fields to JSON "
                        "values (a callable decoders_dist cannot be saved)") from exc
    buffer = io.BytesIO()
    torch.save({"model_state_dict": model.state_dict()}, buffer)
    files[WEIGHTS] = buffer.getvalue()
    for archi in config.custom_architectures:
        if archi not in ARCHITECTURES:
            raise ValueError(f"cannot save: model_config.custom_architectures names {archi!r}, expected a subset "
                             f"of {list(ARCHITECTURES)}")
        files[f"{archi}.pkl"] = _pickle_module(getattr(model, archi), archi)
    manifest = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    files[SIDE_FILE] = json.dumps({"fast_kernels": bool(model.fast_kernels), "crmvae_fast_version": __version__,
                                   "files": manifest}, indent=1).encode()
    return files


def _pickle_module(module: nn.Module, archi: str) -> bytes:
    """``module`` pickled as MultiVae does (cloudpickle, its defining module by value), or with plain pickle
    where cloudpickle is missing (modules whose classes are importable)."""
    try:
        try:
            import cloudpickle
        except ImportError:
            return pickle.dumps(module)
        mod = inspect.getmodule(module)
        if mod is not None:
            try:
                cloudpickle.register_pickle_by_value(mod)
            except ValueError:  # a module cloudpickle cannot register (not in sys.modules): by reference
                pass
        return cloudpickle.dumps(module)
    except Exception as exc:  # pickling runs arbitrary __reduce__ code: whatever it raises, say what failed
        raise TypeError(f"cannot save: the custom {archi} cannot be pickled ({type(exc).__name__}: {exc}); keep "
                        "locks, open files, generators and other unpicklable objects out of the modules' "
                        "attributes") from exc


def _siblings(target: str) -> tuple[str, str]:
    """The folders a swap writes the new model to and moves the old one to, beside ``target``."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.crmvae-saving"), os.path.join(parent, f".{name}.crmvae-replaced")


@contextmanager
def _locked(folder: str):
    """Hold an exclusive ``flock`` on ``folder`` (saves into one parent run one at a time); no lock where the
    platform or the filesystem has none."""
    fd = None
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fp:
        fp.write(data)
        fp.flush()
        os.fsync(fp.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a folder
        pass
    finally:
        os.close(fd)


def _write_all(folder: str, files: dict) -> None:
    """Write ``files`` into ``folder``, the side file last and atomically: its presence marks the folder
    complete."""
    for name, data in files.items():
        if name != SIDE_FILE:
            _write(os.path.join(folder, name), data)
    _write(os.path.join(folder, SIDE_FILE + ".tmp"), files[SIDE_FILE])
    os.replace(os.path.join(folder, SIDE_FILE + ".tmp"), os.path.join(folder, SIDE_FILE))
    _fsync_dir(folder)


def _save_by_swap(target: str, files: dict) -> bool:
    """The ``"swap"`` strategy; False (nothing changed) where a sibling folder cannot be made or moved."""
    parent = os.path.dirname(target)
    new, old = _siblings(target)
    try:
        os.mkdir(new)
    except OSError:  # a parent we cannot write, a read-only filesystem, a name too long for a sibling
        return False
    try:
        _write_all(new, files)
        existed = os.path.isdir(target)
        if existed:
            _carry_other_entries(target, new)
            os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))
            try:
                os.rename(target, old)
            except OSError:  # a mount point, a folder on another filesystem than its parent
                return False
        try:
            os.rename(new, target)
        except OSError:
            if existed:
                os.rename(old, target)
            return False
    finally:
        if os.path.isdir(new):  # anything but a completed swap
            shutil.rmtree(new, ignore_errors=True)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return True


def _carry_other_entries(target: str, new: str) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``target`` that a save does not write."""
    for entry in os.scandir(target):
        if entry.name in MODEL_FILES or entry.name == STAGE:
            continue
        dst = os.path.join(new, entry.name)
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _save_in_place(target: str, files: dict, path: str) -> None:
    """The ``"in_place"`` strategy: stage the files inside ``target`` behind the manifest, then move them in."""
    stage = os.path.join(target, STAGE)
    try:
        os.makedirs(target, exist_ok=True)
        os.mkdir(stage)
    except OSError as exc:
        raise type(exc)(f"cannot save into {path}: cannot write into {target} ({exc.strerror}); give a folder "
                        "where you can write") from exc
    try:
        _write_all(stage, files)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _commit_stage(target)


def _commit_stage(target: str) -> None:
    """Move the files of a complete staging folder into ``target``, the manifest last; remove the model files
    the manifest does not list (e.g. an ``encoders.pkl`` the new model no longer needs); remove the stage."""
    stage = os.path.join(target, STAGE)
    with open(os.path.join(stage, SIDE_FILE), "rb") as fp:
        listed = json.loads(fp.read())["files"]
    for name in listed:
        if os.path.exists(os.path.join(stage, name)):
            os.replace(os.path.join(stage, name), os.path.join(target, name))
    os.replace(os.path.join(stage, SIDE_FILE), os.path.join(target, SIDE_FILE))
    _fsync_dir(target)
    for name in MODEL_FILES:
        if name != SIDE_FILE and name not in listed and os.path.exists(os.path.join(target, name)):
            os.remove(os.path.join(target, name))
    shutil.rmtree(stage, ignore_errors=True)


def _recover(target: str) -> None:
    """Finish or discard what a crashed save into ``target`` left behind (see the module's docstring)."""
    new, old = _siblings(target)
    if not os.path.exists(target) and os.path.isdir(old):  # a swap cut between its two renames
        os.rename(new if os.path.isfile(os.path.join(new, SIDE_FILE)) else old, target)
    for leftover in (new, old):
        if os.path.lexists(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    stage = os.path.join(target, STAGE)
    if os.path.isdir(stage):
        try:
            complete = isinstance(json.loads(_read_bytes(os.path.join(stage, SIDE_FILE))).get("files"), dict)
        except (OSError, ValueError, AttributeError):
            complete = False
        if complete:
            _commit_stage(target)
        else:
            shutil.rmtree(stage, ignore_errors=True)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fp:
        return fp.read()


def _read_file(path: str, why: str, record: Optional[dict] = None) -> bytes:
    """The bytes of a folder's file, checked against its manifest ``record`` (size and sha256) when given."""
    try:
        data = _read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing ({why}); give a complete saved folder, or save the model "
                                "again") from None
    except OSError as exc:
        raise CorruptFolderError(path, f"it cannot be read ({exc.strerror})", "check its permissions") from exc
    if record is not None:
        if len(data) != record["size"]:
            problem = f"it has {len(data)} bytes where {SIDE_FILE} recorded {record['size']} when it was saved"
        elif hashlib.sha256(data).hexdigest() != record["sha256"]:
            problem = f"its sha256 differs from the one {SIDE_FILE} recorded when it was saved"
        else:
            return data
        raise CorruptFolderError(path, problem, "it was damaged or replaced after the save (another program, e.g. "
                                 f"MultiVae's save, may have rewritten the folder); save the model again, or delete "
                                 f"{SIDE_FILE} to load the folder unchecked")
    return data


# ---------------------------------------------------------------------------------------------------- loading
def load_model(cls, dir_path, fast_kernels: Optional[bool] = None, *, encoders: Optional[Mapping] = None,
               decoders: Optional[Mapping] = None):
    """Load a folder written by :func:`save_model` (or by MultiVae's ``CRMVAE.save``) as a ``cls`` model.

    ``fast_kernels=None`` takes the value saved in ``crmvae_fast.json`` (True for a folder MultiVae wrote).
    ``encoders`` / ``decoders`` (modality name -> ``nn.Module``, one per saved modality) replace the folder's
    pickled architectures, which are then not opened; otherwise a pickled architecture is unpickled (with a
    warning, once per folder and process) only where ``model_config.json`` lists it in ``custom_architectures``.
    Files listed in the side file's manifest are checked against their size and sha256 before they are parsed.

    Raises ``TypeError`` for arguments of the wrong type, ``FileNotFoundError`` for a missing folder or file,
    ``NotADirectoryError`` for a path that is a file, ``ValueError`` for a folder of another MultiVae model or
    given modules that do not fit it, and :class:`CorruptFolderError` (a ``ValueError``) naming the file that is
    damaged or does not fit the others."""
    if fast_kernels is not None and not isinstance(fast_kernels, bool):
        raise TypeError(f"fast_kernels must be True, False or None (the saved value), got {fast_kernels!r}")
    given = {"encoders": encoders, "decoders": decoders}
    for archi, modules in given.items():
        _check_given(archi, modules)
    path = _as_path(dir_path, "load from")
    target = os.path.realpath(path)
    files = _live_files(target)
    if files is None:
        raise FileNotFoundError(f"cannot load {path}: no such folder; give the folder a CRMVAE was saved to")
    if not os.path.isdir(target) and os.path.exists(target):
        raise NotADirectoryError(f"cannot load {path}: it is a file, expected the folder a CRMVAE was saved to")

    side = _read_side_file(files[SIDE_FILE])
    manifest = side.get("files", {})

    def read(name: str, why: str) -> bytes:
        return _read_file(files[name], why, manifest.get(name))

    config = _parse_config(files[CONFIG], read(CONFIG, "it holds the model's configuration"))
    environment = None
    if os.path.exists(files[ENVIRONMENT]) or ENVIRONMENT in manifest:
        environment = _parse_environment(files[ENVIRONMENT], read(ENVIRONMENT, f"{SIDE_FILE} lists it"))
    state = _parse_weights(files[WEIGHTS], read(WEIGHTS, "it holds the model's weights"))
    for archi, modules in given.items():
        if modules is not None:
            _check_given_names(archi, modules, state, files[WEIGHTS])
    archis = {a: m for a, m in given.items() if m is not None}
    for archi in config.custom_architectures:
        if archi not in archis:
            name = f"{archi}.pkl"
            data = read(name, f"model_config.json lists custom {archi}; pass {archi}= to load_from_folder to give "
                              "them in code instead")
            archis[archi] = _unpickle_architecture(files[name], data, archi, environment, target)
    if fast_kernels is None:
        fast_kernels = side.get("fast_kernels", True)
    try:
        model = cls(config, fast_kernels=fast_kernels, **archis)
    except (ValueError, TypeError) as exc:
        mods = " and ".join(a for a, m in given.items() if m is not None)
        what = f"it and the given {mods} do not" if mods else "it does not"
        raise CorruptFolderError(files[CONFIG], f"{what} build a CRMVAE ({exc})",
                                 "give the folder of a saved CRMVAE, or modules that fit its configuration") from exc
    _check_state_fits(model, state, files[WEIGHTS], [a for a, m in given.items() if m is not None])
    model.load_state_dict(state)
    return model


def _check_given(archi: str, modules) -> None:
    if modules is None:
        return
    if not isinstance(modules, (Mapping, nn.ModuleDict)) or not all(isinstance(k, str) for k in modules):
        raise TypeError(f"{archi} must be a dict modality name -> nn.Module (or an nn.ModuleDict), got "
                        f"{type(modules).__name__}")
    bad = {k: type(v).__name__ for k, v in modules.items() if not isinstance(v, nn.Module)}
    if bad:
        raise TypeError(f"{archi} must map modality names to nn.Module, got {bad}; pass one module per modality")


def _live_files(target: str) -> Optional[dict]:
    """Where each file of the model a load must read is (name -> path), the recovery rules of the module's
    docstring applied; None where there is no folder."""
    new, old = _siblings(target)
    if not os.path.exists(target):
        if not os.path.isdir(old):
            return None
        source = new if os.path.isfile(os.path.join(new, SIDE_FILE)) else old  # a swap cut between its renames
        return {name: os.path.join(source, name) for name in MODEL_FILES}
    files = {name: os.path.join(target, name) for name in MODEL_FILES}
    stage = os.path.join(target, STAGE)
    if os.path.isfile(os.path.join(stage, SIDE_FILE)):  # an in-place save cut while moving its files in
        files.update({name: os.path.join(stage, name) for name in MODEL_FILES
                      if os.path.exists(os.path.join(stage, name))})
    return files


def _json_object(path: str, data: bytes, remedy: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFolderError(path, f"it is not valid JSON ({exc})", remedy) from exc
    if not isinstance(value, dict):
        raise CorruptFolderError(path, f"it holds a JSON {type(value).__name__}, expected a JSON object", remedy)
    return value


def _read_side_file(path: str) -> dict:
    """The side file's settings, checked; {} where there is none (a folder MultiVae wrote)."""
    if not os.path.exists(path):
        return {}
    remedy = (f"delete {SIDE_FILE} to load the folder unchecked as MultiVae does, and pass fast_kernels= to "
              "load_from_folder")
    side = _json_object(path, _read_file(path, "this package's settings"), remedy)
    if not isinstance(side.get("fast_kernels", True), bool):
        raise CorruptFolderError(path, f"it must hold a boolean 'fast_kernels', got {side['fast_kernels']!r}", remedy)
    legacy = {"fast_kernels", "crmvae_fast_version"}  # what a side file without a manifest holds (older saves)
    if "files" not in side and not set(side) <= legacy:
        raise CorruptFolderError(path, f"it is not crmvae_fast's side file, or its manifest is damaged (its keys are "
                                       f"{sorted(side)})", remedy)
    manifest = side.get("files", {})
    good = isinstance(manifest, dict) and all(
        name in MODEL_FILES and name != SIDE_FILE and isinstance(rec, dict) and isinstance(rec.get("size"), int)
        and isinstance(rec.get("sha256"), str) for name, rec in manifest.items())
    if not good:
        raise CorruptFolderError(path, "its 'files' manifest must map the folder's model files to their 'size' and "
                                       f"'sha256', got {manifest!r:.200}", remedy)
    return side


def _parse_config(path: str, data: bytes) -> CRMVAEConfig:
    remedy = "give the folder of a saved CRMVAE, or save the model again"
    saved = _json_object(path, data, remedy)
    name = saved.get("name", "CRMVAEConfig")
    if name != "CRMVAEConfig":
        if isinstance(name, str) and name.endswith("Config") and "n_modalities" in saved:
            model = name[: -len("Config")]
            raise ValueError(f"{os.path.dirname(path)} holds a {model} (model_config.json names {name!r}), not a "
                             f"CRMVAE; load it with multivae.models.{model}.load_from_folder, or give the folder of "
                             "a saved CRMVAE")
        raise CorruptFolderError(path, f"it is not a model configuration (it names {name!r})", remedy)
    archis = saved.get("custom_architectures", [])
    if not isinstance(archis, list) or any(a not in ARCHITECTURES for a in archis):
        raise CorruptFolderError(path, f"its custom_architectures must be a list of {list(ARCHITECTURES)}, got "
                                       f"{archis!r}", remedy)
    try:
        return CRMVAEConfig.from_dict(saved)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise CorruptFolderError(path, f"it is not a valid CRMVAEConfig ({type(exc).__name__}: {exc})", remedy) from exc


def _parse_environment(path: str, data: bytes) -> dict:
    env = _json_object(path, data, "save the model again, or delete the file")
    if not isinstance(env.get("python_version"), str):
        raise CorruptFolderError(path, f"it must hold the saving Python's version as a string 'python_version', got "
                                       f"the keys {sorted(env)}", "save the model again, or delete the file")
    return env


def _parse_weights(path: str, data: bytes) -> dict:
    """``model_state_dict`` of ``model.pt``, loaded with ``weights_only=True`` (a pickle of anything but tensors
    and plain containers is refused, not run)."""
    remedy = "save the model again, or give a folder whose model.pt torch.save wrote"
    try:
        weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load on damaged bytes raises RuntimeError, EOFError, OSError, ...: say which
        raise CorruptFolderError(path, _load_problem(exc), remedy) from exc
    if not isinstance(weights, dict) or "model_state_dict" not in weights:
        keys = sorted(map(str, weights)) if isinstance(weights, dict) else type(weights).__name__
        raise CorruptFolderError(path, f"it holds no 'model_state_dict' (it holds {keys})", remedy)
    state = weights["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFolderError(path, "its 'model_state_dict' must map parameter names to tensors", remedy)
    return state


def _load_problem(exc: Exception) -> str:
    """What a failed ``torch.load(weights_only=True)`` says about the file, in words."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # the safe unpickler refused an instruction or a global
        detail = (text.split("WeightsUnpickler error:", 1)[1].strip().splitlines() or [""])[0]
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
        return (f"it holds objects other than tensors, or pickle instructions a safe load refuses to run "
                f"({refused.group(1) if refused else detail.strip()})")
    first = (text.strip().splitlines() or [""])[0]
    return f"it is not a file torch.save wrote, or it was cut or damaged ({type(exc).__name__}: {first})"


def _unpickle_architecture(path: str, data: bytes, archi: str, environment: Optional[dict], folder: str):
    """Unpickle ``encoders.pkl`` / ``decoders.pkl`` (code from the folder: warned about once per folder)."""
    if folder not in _warned_unpickling:
        _warned_unpickling.add(folder)
        warnings.warn(f"loading {folder} unpickles its custom architectures (the .pkl files "
                      "model_config.json lists), which runs code from the folder: load only folders you trust, "
                      "or pass encoders=/decoders= to load_from_folder to give the modules in code", stacklevel=4)
    try:
        modules = _CPUUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # unpickling runs the file's code: whatever it raises, name the file
        saved = (environment or {}).get("python_version")
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        version = f"; it was saved by Python {saved}, this is {here}" if saved and saved != here else ""
        raise CorruptFolderError(
            path, f"its custom {archi} cannot be unpickled ({type(exc).__name__}: {exc}{version})",
            f"make the modules' code importable here, or pass {archi}= to load_from_folder") from exc
    if not isinstance(modules, (Mapping, nn.ModuleDict)) or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise CorruptFolderError(path, f"it holds a {type(modules).__name__}, expected a dict of nn.Module",
                                 f"pass {archi}= to load_from_folder, or save the model again")
    return modules


def _check_given_names(archi: str, modules: Mapping, state: dict, weights_path: str) -> None:
    saved = sorted({k.split(".")[1] for k in state if k.startswith(f"{archi}.") and k.count(".") >= 2})
    if sorted(modules) != saved:
        raise ValueError(f"the {archi} given to load_from_folder name {sorted(modules)}, but {weights_path} holds "
                         f"{archi} for {saved}; pass one module per saved modality")


def _check_state_fits(model: nn.Module, state: dict, path: str, given: list) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{what} {items[:4]}{' ...' if len(items) > 4 else ''}" for what, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shapes saved vs built", shapes))
                 if items]
        source = f"the given {' and '.join(given)}" if given else CONFIG
        raise CorruptFolderError(path, f"its weights do not fit the model built from {source}: {'; '.join(parts)}",
                                 "the files come from different saves, or the modules differ from the saved ones; "
                                 "save the model again or pass modules of the saved shapes")


class _CPUUnpickler(pickle.Unpickler):
    """Loads pickled modules on the CPU, whatever device their tensors were saved from (as pythae does)."""

    def find_class(self, module, name):
        if module == "torch.storage" and name == "_load_from_bytes":
            return lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)
        return super().find_class(module, name)


# ------------------------------------------------------------------------------------------------- data files
def load_data_file(path):
    """A ``torch.save``'d dataset for ``crmvae-fast evaluate --data``, loaded with ``weights_only=True``.

    Accepted: ``{"data": {name: tensor}, "masks": {name: tensor}}`` (masks optional, other keys such as
    ``"labels"`` kept), and MultiVae's ``MultimodalBaseDataset`` / ``IncompleteDataset`` objects of tensors (their
    classes are allowed into the safe load where multivae is importable). Returns the loaded object. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything else (a folder, bytes
    that ``torch.save`` did not write, a pickle of other objects, a wrong layout); nothing in the file runs."""
    path = _as_path(path, "load data from", "file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such data file; give the file a torch.save of "
                                "{'data': {name: tensor}, 'masks': {name: tensor}} went to")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, expected a data file written by torch.save")
    hint = ("save the dataset as torch.save({'data': ds.data, 'masks': ds.masks}, path), every value a tensor "
            "(torch.as_tensor turns numpy arrays into tensors)")
    classes = _dataset_classes()
    try:
        with torch.serialization.safe_globals(classes):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a refused pickle, or damaged bytes: RuntimeError, EOFError, OSError, ...
        raise ValueError(f"{path}: {_load_problem(exc)}; {hint}") from exc
    data = obj.get("data") if isinstance(obj, Mapping) else getattr(obj, "data", None)
    masks = obj.get("masks") if isinstance(obj, Mapping) else getattr(obj, "masks", None)
    for what, table in (("data", data), ("masks", masks)):
        if table is None and what == "masks":
            continue
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"{path} holds {_describe(obj)}, expected a non-empty {what!r} dict name -> tensor; "
                             f"{hint}")
        bad = {m: type(v).__name__ for m, v in table.items() if not isinstance(v, torch.Tensor)}
        if bad:
            raise ValueError(f"{path}: {what} of {sorted(bad)} are {sorted(set(bad.values()))}, expected tensors; "
                             f"{hint}")
    return obj


def _dataset_classes() -> list:
    try:
        from multivae.data.datasets.base import IncompleteDataset, MultimodalBaseDataset
    except Exception:  # multivae missing or broken: plain dicts only
        return []
    return [MultimodalBaseDataset, IncompleteDataset]


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {sorted(map(str, obj))}"
    return f"a {type(obj).__name__}"
