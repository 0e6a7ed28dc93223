"""Async, atomic, checksummed checkpoints with exact resume.

A run dir holds its checkpoints like this (a contract other code and tools rely on):

    RUN/checkpoints/
        step_000500/
            model/              HF format: config.json + *.safetensors (written by `save_model`)
            state.safetensors   every tensor of the trainer state (optimizer moments, RNG bytes, ...)
            state.json          everything else: numbers, strings, lists, dicts, tuples (no pickle)
            manifest.json       written LAST: sha256 and size of every other file in the folder
        step_001000/ ...
        latest                  "step_001000\n", replaced atomically once the folder is complete

Why each piece is there:
- Save is split in two (TRANSOM, arXiv 2308.16538; torchtitan's async checkpointing): the training loop
  only waits for a copy of the tensors into host buffers; a writer thread serialises, hashes, fsyncs and
  renames while training goes on. TRANSOM saves a 175B model in 10.6 s against 4.5 min synchronous,
  torchtitan's async save blocks under a second; `bench/checkpoint.py` measures ours.
- Atomic commit: everything is written under `.tmp_step_NNNNNN_<pid>/`, fsynced, renamed into place and the
  parent directory fsynced; only then is `latest` replaced (tmp file + fsync + os.replace). A process killed
  at any instant leaves either the old `latest` or the new one, each naming a complete folder.
- Checksums: a step folder can still be damaged afterwards (bad disk, partial copy, someone's rsync).
  `latest()` verifies the manifest and falls back to the previous intact checkpoint with a warning that
  names the damaged file, so a resume never starts from garbage.
- No pickle: tensors go to safetensors, the rest to JSON, so a checkpoint is safe to load from anywhere
  and readable with standard tools.

Optimizer state goes through `torch.distributed.checkpoint.state_dict` (see `optimizer_state_dict`):
it works on a plain module without a process group, and it is the same call for FSDP2 shards later.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "nanoseek-checkpoint/1"
STEP_DIR_RE = re.compile(r"^step_(\d{6,})$")
# Leftovers of a killed writer: `.tmp_step_000500_<pid>` (being written) and `.trash_step_000500_<pid>`
# (being deleted), `.latest.tmp_<pid>`. All are safe to remove once their process is gone.
STALE_RE = re.compile(r"^\.(tmp_step_\d{6,}|trash_step_\d{6,}|latest\.tmp)_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or read."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------------
# Nested state <-> (flat tensors, JSON). Tensors are replaced in the JSON tree by {"__tensor__": key};
# JSON has no tuples, non-string dict keys or arrays, so those get a one-key tagged object too.

_TENSOR, _TUPLE, _DICT, _NDARRAY = "__tensor__", "__tuple__", "__dict__", "__ndarray__"
_TAGS = (_TENSOR, _TUPLE, _DICT, _NDARRAY)


def flatten_state(nested: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into `{key: tensor}` (for safetensors) and a JSON-able tree (for state.json).

    Supported leaves: tensors (any dtype, 0-d included), None, bool, int, float (nan/inf too), str, numpy
    arrays (small ones, such as RNG states: stored as JSON lists) and numpy scalars (stored as Python
    numbers). Containers: dict (any JSON-leaf keys), list, tuple. Tensors are returned by reference; the
    manager copies them. Keys are readable paths such as "optimizer/state.0.weight.exp_avg".
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            key = path or "tensor"
            if key in tensors:  # only with odd keys ("a/b" next to nested "a" -> "b"): keep it unique
                n = 1
                while f"{key}#{n}" in tensors:
                    n += 1
                key = f"{key}#{n}"
            tensors[key] = obj
            return {_TENSOR: key}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return {_NDARRAY: {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            prefix = f"{path}/" if path else ""
            if all(isinstance(k, str) and k not in _TAGS for k in obj):
                return {k: walk(v, prefix + k) for k, v in obj.items()}
            return {_DICT: [[walk(k, prefix + "key"), walk(v, prefix + str(k))] for k, v in obj.items()]}
        raise TypeError(
            f"cannot checkpoint a {type(obj).__name__} at {path or 'the top level'!r}: checkpoints hold only "
            "tensors, numbers, strings, None, numpy arrays and lists/tuples/dicts of them (no pickle). "
            "Store its state_dict() instead, or convert it to one of those types."
        )

    meta = walk(nested, "")
    return tensors, meta


def unflatten_state(tensors: dict[str, torch.Tensor], meta: Any) -> Any:
    """Inverse of `flatten_state`: rebuild the nested state from the tensors and the JSON tree."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if len(obj) == 1:
            ((tag, value),) = obj.items()
            if tag == _TENSOR:
                if value not in tensors:
                    raise CheckpointError(f"state.json refers to tensor {value!r}, which the tensor file lacks")
                return tensors[value]
            if tag == _TUPLE:
                return tuple(walk(v) for v in value)
            if tag == _DICT:
                return {walk(k): walk(v) for k, v in value}  # tuple keys come back as tuples
            if tag == _NDARRAY:
                return np.array(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
        return {k: walk(v) for k, v in obj.items()}

    return walk(meta)


# ----------------------------------------------------------------------------------------------------
# RNG and optimizer state: exact resume needs every generator and the optimizer restored
# (REFERENCE.md, "Training system numbers").


def capture_rng_state() -> dict:
    """Python `random`, numpy's global generator, torch CPU and (when present) every CUDA device."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _optimizer_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # State keyed by parameter name ({"state": {fqn: {...}}, "param_groups": [{"params": [fqn, ...]}]}), not by
    # position, so it survives a change of parameter order and is the same on one process and under FSDP2. Not
    # the flattened form: its loader turns a parameter without state into a broken entry (torch 2.13).
    return StateDictOptions(flatten_optimizer_state_dict=False, strict=strict)


def optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, via torch.distributed.checkpoint.state_dict.

    Loading a plain `optimizer.state_dict()` into a fresh optimizer was seen to diverge (REFERENCE.md);
    this path also works without an initialised process group for an ordinary module.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_optimizer_options())


def load_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # Not strict: a trainable parameter that never got a gradient (e.g. the MTP module when its loss weight is 0)
    # has no AdamW state yet, and that is a legitimate state to resume from.
    set_optimizer_state_dict(model, optimizer, state, options=_optimizer_options(strict=False))


# ----------------------------------------------------------------------------------------------------
# Files: fsync, hashing, manifest, verification.


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is durable only once its directory entry is: fsync the directory itself.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_fsync(path: Path) -> dict:
    # One pass that hashes the file and makes it durable. hashlib releases the GIL on large buffers, so
    # this runs in the writer thread without slowing the training loop much.
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.fsync(f.fileno())
    return {"sha256": digest, "size": path.stat().st_size}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json_durable(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path: Path) -> dict:
    """Check every file against manifest.json; return the manifest or raise CheckpointError naming the file."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path} is missing: the save of {path.name} did not finish (killed mid-write?)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({e}); the checkpoint is damaged") from e
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is listed in the manifest but missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {expected['size']}: file damaged")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in the manifest: file damaged")
    return manifest


# ----------------------------------------------------------------------------------------------------
# When to save: every N steps and/or every M minutes (DeepSeek checkpoints every ~5 minutes).


def should_save(step: int, *, every_steps: int | None, every_minutes: float | None,
                last_save_time: float, now: float | None = None) -> bool:
    """True if `step` is a multiple of `every_steps` or `every_minutes` have passed since `last_save_time`.

    Times come from `time.monotonic()`. Under several processes the clock differs per rank: decide on
    rank 0 and broadcast, or every rank must save the same step.
    """
    if every_steps and step % every_steps == 0:
        return True
    now = time.monotonic() if now is None else now
    return bool(every_minutes) and now - last_save_time >= every_minutes * 60.0


# ----------------------------------------------------------------------------------------------------
# The manager.


def _default_save_model(path: Path, model_state: dict[str, torch.Tensor], model_meta: Any) -> None:
    from nanoseek.hf import save_hf  # lazily: the checkpoint code must not need the model code to import

    save_hf(path, model_meta, model_state)


def _default_load_model(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    from nanoseek.hf import load_hf

    config, state_dict = load_hf(path)
    return state_dict, config


def save_plain_model(path: Path, model_state: dict[str, torch.Tensor], model_meta: Any) -> None:
    """A model writer for states without a ModelConfig (tests, benches): model.safetensors + meta.json."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(model_state, path / "model.safetensors")
    (path / "meta.json").write_text(json.dumps(model_meta))


def load_plain_model(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    return load_file(path / "model.safetensors"), json.loads((path / "meta.json").read_text())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def _single_threaded():
    # A host memcpy is bandwidth-bound: one thread reaches it. With torch's intra-op pool each copy_ of a
    # few MB waits for every pool thread, and on a busy machine one of them is descheduled: on this 2-core
    # box 60 copies of 4 MB took 0.70 s with 2 threads and 0.03 s with 1 (dev/LOG.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CheckpointManager:
    """Saves and finds checkpoints under `run_dir/checkpoints`.

    Typical trainer use:

        ckpt = CheckpointManager(run_dir, keep_last=3)
        if ckpt.list():                                   # resume (verifies sha256, falls back if damaged)
            c = ckpt.load(); model.load_state_dict(c["model_state"]); ...
        ...
        ckpt.save(step, model_state=model.state_dict(), model_meta=config,
                  state={"optimizer": optimizer_state_dict(model, opt), "rng": capture_rng_state(), ...})
        ...
        ckpt.wait()                                       # before exit: surface errors of the last save

    Only one process (rank 0, or each rank with its own run_dir) may write to a checkpoints folder.
    """

    def __init__(self, run_dir, *, keep_last: int | None = 3, async_save: bool = True,
                 save_model: Callable | None = None, load_model: Callable | None = None,
                 reuse_buffers: bool = True):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.async_save = async_save
        self.save_model = save_model or _default_save_model
        self.load_model = load_model or _default_load_model
        # Host copies reused from one save to the next (they cost one host copy of the state in memory):
        # copying into pages already mapped blocked 0.14 s for 2.4 GB against 1.0 s for a fresh clone
        # (bench/checkpoint.py). For GPU tensors they are pinned, so the device-to-host copy is async and
        # runs at full PCIe speed (torchtitan does the same for its async checkpoint staging).
        self.reuse_buffers = reuse_buffers
        self._buffers: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_step: int | None = None
        self.last_blocking_s = 0.0  # what the last save() cost the caller; for metrics and the bench
        self._remove_stale()

    # -- writing ---------------------------------------------------------------------------------------

    def save(self, step: int, *, model_state: dict[str, torch.Tensor], model_meta: Any, state: dict,
             blocking: bool = False) -> None:
        """Snapshot now (the only part the caller waits for), write in the background.

        Waits for the previous save first and raises its error, if it had one. With `blocking=True` (or
        `async_save=False`) the write happens before returning and its errors are raised here.
        """
        t0 = time.perf_counter()
        self.wait()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        # Validate and freeze the non-tensor part here, in the caller's thread: a bad type is the caller's
        # bug and should be raised at the save() call, and the trainer may mutate its dicts right after.
        state_tensors, state_meta = flatten_state(state)
        state_json = json.dumps({"format": FORMAT, "step": step, "state": state_meta})
        model_meta = copy.deepcopy(model_meta)
        snapshot = self._snapshot({**{f"model:{k}": v for k, v in model_state.items()},
                                   **{f"state:{k}": v for k, v in state_tensors.items()}})
        model_snap = {k[6:]: v for k, v in snapshot.items() if k.startswith("model:")}
        state_snap = {k[6:]: v for k, v in snapshot.items() if k.startswith("state:")}
        args = (step, model_snap, model_meta, state_snap, state_json)
        if blocking or not self.async_save:
            self._write_in_thread(*args)  # same path, in this thread: errors come out of wait() alike
            self.last_blocking_s = time.perf_counter() - t0
            self.wait()
            return
        self._thread = threading.Thread(target=self._write_in_thread, args=args,
                                        name=f"checkpoint-{step}", daemon=False)
        # Non-daemon: an interpreter that exits normally still finishes the checkpoint it started.
        self._thread.start()
        self.last_blocking_s = time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the background save is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, step = self._error, self._error_step
            self._error = self._error_step = None
            raise CheckpointError(
                f"saving checkpoint {step_dir_name(step)} in {self.dir} failed: {type(error).__name__}: "
                f"{error}. Nothing of it was kept; the previous checkpoint is intact (`latest` -> "
                f"{self._read_latest_name() or 'none yet'}). Fix the cause (disk space, permissions) and save again."
            ) from error

    def _snapshot(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The one blocking part of a save: copy every tensor to a host buffer the writer owns. On GPU the
        # copies are queued non-blocking into pinned memory and synchronised once at the end.
        out, on_gpu = {}, False
        with torch.no_grad(), _single_threaded():
            for key, t in tensors.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"model_state[{key[6:]!r}] is a {type(t).__name__}, expected a tensor")
                buf = self._buffers.get(key) if self.reuse_buffers else None
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    pin = t.device.type == "cuda"
                    buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                    if self.reuse_buffers:
                        self._buffers[key] = buf
                on_gpu |= t.device.type == "cuda"
                buf.copy_(t.detach(), non_blocking=t.device.type == "cuda")
                out[key] = buf
        if on_gpu:
            torch.cuda.synchronize()
        if self.reuse_buffers and len(self._buffers) > len(tensors):  # drop buffers of vanished tensors
            self._buffers = {k: self._buffers[k] for k in tensors}
        return out

    def _write_in_thread(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # re-raised by the next save()/wait() in the caller's thread
            self._error, self._error_step = e, args[0]

    def _write(self, step: int, model_state: dict, model_meta: Any, state_tensors: dict,
               state_json: str) -> None:
        name = step_dir_name(step)
        final = self.dir / name
        tmp = self.dir / f".tmp_{name}_{os.getpid()}"
        trash = self.dir / f".trash_{name}_{os.getpid()}"
        committed = renamed = False
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            self.save_model(tmp / "model", model_state, model_meta)
            save_file(state_tensors, tmp / "state.safetensors")
            (tmp / "state.json").write_text(state_json)
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                files[file.relative_to(tmp).as_posix()] = _hash_and_fsync(file)
            _write_json_durable(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": files})
            for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
                _fsync_dir(d)
            _fsync_dir(tmp)
            # Re-saving a step (resumed before it, or it was damaged): move the old one aside first, since
            # rename cannot replace a non-empty directory. `latest` never names a missing folder for long:
            # latest() falls back to the newest intact checkpoint meanwhile.
            if final.exists():
                os.rename(final, trash)
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(self.dir)
            self._write_latest(name)
            committed = True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if renamed and not committed:
                shutil.rmtree(final, ignore_errors=True)
            if trash.exists() and not final.exists():
                os.rename(trash, final)  # put back the same-step folder we moved aside
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        self._prune()

    def _write_latest(self, name: str) -> None:
        tmp = self.dir / f".latest.tmp_{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "latest")
        _fsync_dir(self.dir)

    def _prune(self) -> None:
        # Keep the newest `keep_last` and always the one `latest` names. Move to trash first so a crash
        # mid-delete never leaves a half-deleted folder under a step name.
        if self.keep_last is None:
            return
        keep = {p.name for p in self.list()[-self.keep_last:]} | {self._read_latest_name()}
        for path in self.list():
            if path.name not in keep:
                trash = self.dir / f".trash_{path.name}_{os.getpid()}"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self) -> None:
        # Leftovers of a killed run: tmp folders never renamed, trash never deleted, tmp `latest` files.
        for path in self.dir.iterdir():
            m = STALE_RE.match(path.name)
            if m and not _pid_alive(int(m.group(2))):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------------

    def list(self) -> list[Path]:
        """Step folders, oldest first (not verified; see `latest()`)."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir()
                 if (m := STEP_DIR_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def _read_latest_name(self) -> str | None:
        try:
            return (self.dir / "latest").read_text().strip() or None
        except FileNotFoundError:
            return None

    def latest(self) -> Path | None:
        """The checkpoint `latest` names if it verifies, else the newest older one that does.

        `latest` is the commit point: a folder newer than it (renamed, but killed before `latest` was
        replaced) is complete, yet only used when nothing `latest` names or precedes verifies.
        """
        named = self._read_latest_name()
        paths = self.list()
        named_step = int(STEP_DIR_RE.match(named).group(1)) if named and STEP_DIR_RE.match(named) else None
        if named and named_step is not None and not (self.dir / named).is_dir():
            warnings.warn(f"{self.dir / 'latest'} names {named}, which does not exist; using the newest "
                          "intact checkpoint instead", stacklevel=2)

        def order(p: Path) -> tuple:  # the named one, then older ones newest first, then newer ones
            step = int(STEP_DIR_RE.match(p.name).group(1))
            if named_step is None:
                return (0, -step)
            return (0 if step == named_step else 1 if step < named_step else 2, -step)

        for path in sorted(paths, key=order):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as e:
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
        return None

    def load(self, path: Path | None = None) -> dict:
        """{"step", "model_state", "model_meta", "state"} from `path` (default: `latest()`), verified."""
        if path is None:
            path = self.latest()  # verifies
            if path is None:
                raise CheckpointError(f"no intact checkpoint in {self.dir}; check `list()` before loading")
        else:
            path = Path(path)
            verify_checkpoint(path)
        doc = json.loads((path / "state.json").read_text())
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{path / 'state.json'} has format {doc.get('format')!r}, expected {FORMAT!r}")
        state = unflatten_state(load_file(path / "state.safetensors"), doc["state"])
        model_state, model_meta = self.load_model(path / "model")
        return {"step": doc["step"], "model_state": model_state, "model_meta": model_meta, "state": state}
