"""Checkpoints: one format for every parallel strategy and world size, each checkpoint proving its integrity.

A checkpoint is a folder ``ckpt-e<epoch>-s<step>`` in the run folder, written by ``torch.distributed.checkpoint``
(DCP) from every rank's state (whole tensors for a replicated run, shards for FSDP), so a run saved on one rank
resumes on two and back, and a DDP run resumes under FSDP. Beside DCP's files it holds ``manifest.json``: the
size and SHA-256 of every file, the epoch, the step and whether the checkpoint ends an epoch. The folder is
written as ``<name>.tmp``, the manifest last, then renamed into place, so:

- a checkpoint counts only when its manifest verifies (a kill at any moment, or a flipped byte, makes it
  "not verified" and the previous one is used, with a one-line reason);
- which checkpoints end an epoch, and so which ones pruning keeps, is read from the manifests, never from a
  second file updated afterwards.

``CheckpointManager`` saves, prunes and loads for a run; ``read_latest`` reads the newest verified checkpoint
as plain state dicts in one process (export, evaluation, fine-tuning); ``lock_run_folder`` keeps a second run
out of a folder in use. Everything is read with ``weights_only=True``: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from conmim._fs import write_atomic

FORMAT = 2  # conmim 0.1 wrote ckpt-*.pt files (DDP) and ckpt-*.dcp folders (FSDP) without manifests
MANIFEST = "manifest.json"
_NAME = re.compile(r"^ckpt-e(\d{4,})-s(\d{8,})$")
_OLD = ("ckpt-e*-s*.pt", "ckpt-*.dcp")
_RUN_KEY = "run"  # the run state (epoch, step, RNG, ...): torch.save bytes in a uint8 tensor


class CheckpointError(RuntimeError):
    """A checkpoint or run folder that cannot be used; the message says why in one line."""


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:08d}"


def checkpoints(out) -> list[Path]:
    """The checkpoint folders in ``out``, newest first, verified or not (see :func:`verify`)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _boundary(name: str) -> None:
    """A point between two writes of a save; the fault-injection tests stop the process here."""


# ------------------------------------------------------------------------------------------------ manifests
def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_manifest(folder: Path, info: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    listing = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in files}
    write_atomic(folder / MANIFEST, json.dumps({"format": FORMAT, **info, "files": listing}, indent=1))


def read_manifest(path) -> dict:
    """A checkpoint's manifest, unverified (cheap: pruning reads only this); CheckpointError if unreadable."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError("incomplete: it has no manifest") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"its manifest cannot be read ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"its manifest is not of format {FORMAT}")
    return manifest


def manifests(out) -> list[dict]:
    """The readable manifests of ``out``'s checkpoints, newest first, unverified (cheap)."""
    found = []
    for path in checkpoints(out):
        try:
            found.append(read_manifest(path))
        except CheckpointError:
            continue
    return found


def check_resumable(out, info: dict) -> None:
    """CheckpointError when ``out`` holds checkpoints of conmim 0.1, or checkpoints whose manifests hold another
    value of a key of ``info`` (given to :meth:`CheckpointManager.save`): a run that would resume from them
    would not continue the same run. Reads the manifests only."""
    refuse_old_format(out)
    for manifest in manifests(out):
        for key, here in info.items():
            there = manifest.get(key, here)
            if there == here:
                continue
            if isinstance(here, dict):
                what = ", ".join(f"{k}: {there.get(k)!r} there vs {v!r} here" for k, v in here.items() if there.get(k) != v)  # fmt: skip
            else:
                what = f"{there!r} there vs {here!r} here"
            raise CheckpointError(
                f"run folder {str(out)!r} holds checkpoints of another {key} ({what}): resume with the same "
                "values, or choose another --out"
            )


def verify(path) -> dict:
    """The manifest of the checkpoint folder ``path`` once every file it lists has its size and SHA-256;
    CheckpointError naming the first file that does not."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, want in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}")
        if _digest(f) != want["sha256"]:
            raise CheckpointError(f"{name} does not match its checksum (corrupt)")
    return manifest


def refuse_old_format(out) -> None:
    """CheckpointError when ``out`` holds only checkpoints of conmim 0.1's formats."""
    out = Path(out)
    if not out.is_dir() or checkpoints(out):
        return
    old = sorted(p.name for pattern in _OLD for p in out.glob(pattern))
    if old:
        raise CheckpointError(
            f"run folder {str(out)!r} holds checkpoints written by conmim 0.1 ({old[-1]}), which this version "
            f"(checkpoint format {FORMAT}) does not read: resume or export them with conmim 0.1, or choose a new --out"
        )


# ------------------------------------------------------------------------------------------------ run state
def rng_state() -> dict:
    """The host's random states (torch, Python, every CUDA device)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(run: dict) -> torch.Tensor:
    """``run`` as bytes in a uint8 tensor, after checking that ``_decode`` reads it back."""
    if not isinstance(run, dict):
        raise TypeError(f"run_state must be a dict, got {type(run).__name__}")
    try:
        buf = io.BytesIO()
        torch.save(run, buf)
        blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        _decode(blob)
    except Exception as exc:
        raise TypeError(
            "run_state must hold only what torch.load(weights_only=True) reads back (tensors, numbers, strings, "
            f"None, and lists, tuples and dicts of them): {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    return blob


def _decode(blob: torch.Tensor) -> dict:
    return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)


# -------------------------------------------------------------------------------------------------- parts
def _state_of(parts: dict) -> dict:
    """DCP state dicts of the parts: a module -> its parameters and buffers (sharded or whole); (module,
    optimizer) -> the optimizer state keyed by parameter names (initialised if the optimizer has not stepped)."""
    state = {}
    for name, part in parts.items():
        if isinstance(part, tuple):
            state[name] = get_optimizer_state_dict(*part)
        elif isinstance(part, nn.Module):
            state[name] = get_model_state_dict(part)
        else:
            raise TypeError(f"checkpoint part {name!r} must be a module or (module, optimizer), got {part!r}")
    return state


def _apply(parts: dict, state: dict) -> None:
    for name, part in parts.items():
        if isinstance(part, tuple):
            set_optimizer_state_dict(*part, optim_state_dict=state[name])
        else:
            set_model_state_dict(part, state[name])


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _quiet_dcp():
    """DCP warns when it runs without a process group: one process is what this module intends then."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(process group|no_dist|single process).*")
        yield


class CheckpointManager:
    """Saves, prunes and loads a run's checkpoints in ``out``.

    Args:
        out: the run folder.
        keep_last: how many newest checkpoints ``save`` keeps.
        keep_every_epochs: also keep the epoch-end checkpoint of every epoch divisible by this (0: none).
        log: receives one line per event (which checkpoint was loaded, which one could not be and why).
    """

    def __init__(self, out, keep_last: int = 3, keep_every_epochs: int = 0, log=print):
        self.out, self.keep_last, self.keep_every, self.log = Path(out), keep_last, keep_every_epochs, log

    def save(
        self, parts: dict, run_state: dict, epoch: int, step: int, epoch_end: bool, info: dict | None = None
    ) -> Path:
        """Write ``parts`` and ``run_state`` as checkpoint ``ckpt-e<epoch>-s<step>``, then prune; every rank calls
        it (rank 0's ``run_state`` is the one saved). ``info``: small JSON values added to the manifest, for
        checks that must not load the checkpoint (see :func:`manifests`). A kill at any point leaves the new checkpoint either
        complete and verified or absent (an earlier one of the same name is replaced only after the new one is
        complete), and every other checkpoint untouched."""
        blob = _encode(run_state)  # every rank: a bad run state fails them all here, before any collective
        path = self.out / checkpoint_name(epoch, step)
        tmp = path.with_name(path.name + ".tmp")
        rank = _rank()
        if rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
        _barrier()
        state = _state_of(parts)
        if rank == 0:
            state[_RUN_KEY] = blob
        with _quiet_dcp():
            # replicated tensors (a DDP run's weights, BatchNorm statistics) are written once, by rank 0
            dcp.save(
                state, checkpoint_id=str(tmp), planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True)
            )
        _boundary("files written")
        if rank == 0:
            _write_manifest(tmp, {**(info or {}), "epoch": epoch, "step": step, "epoch_end": bool(epoch_end)})
            _boundary("manifest written")
            old = path.with_name(path.name + ".deleting")
            if path.exists():  # the same step saved again (a resumed run's last checkpoint): replace it
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(self.out)
            _boundary("renamed")
            shutil.rmtree(old, ignore_errors=True)
            self.prune()
        _barrier()
        return path

    def _remove_leftovers(self) -> None:
        """What a killed save or prune left: a checkpoint being written or being deleted (never a real one)."""
        for stale in [*self.out.glob("ckpt-*.tmp"), *self.out.glob("ckpt-*.deleting")]:
            shutil.rmtree(stale, ignore_errors=True)

    def prune(self) -> None:
        """Remove the checkpoints beyond the newest ``keep_last`` that do not end an epoch divisible by
        ``keep_every_epochs`` (as their manifests say; one without a readable manifest is removed too). Each is
        renamed away before it is deleted, so a kill never leaves a partial checkpoint under a real name."""
        for old in checkpoints(self.out)[self.keep_last :]:
            try:
                manifest = read_manifest(old)
                keep = (
                    self.keep_every > 0 and manifest["epoch_end"] and manifest["epoch"] % self.keep_every == 0
                )
            except CheckpointError:
                keep = False
            if not keep:
                gone = old.with_name(old.name + ".deleting")
                os.replace(old, gone)
                _boundary("pruning")
                shutil.rmtree(gone, ignore_errors=True)

    def load_latest(self, parts: dict, verb: str = "resuming from") -> dict | None:
        """Load the newest verified checkpoint into ``parts`` (resharded to this world size; every rank calls
        it) and return its run state, or None when there is none. A checkpoint that does not verify or load is
        reported in one line and the previous one is tried; every rank reaches the same verdict."""
        refuse_old_format(self.out)
        if _rank() == 0 and self.out.is_dir():
            self._remove_leftovers()
        for path in checkpoints(self.out):
            why = _agree(lambda p=path: _verified_or_reason(p))
            if why is None:
                try:
                    run = _load(path, parts)
                except Exception as exc:  # DCP shares one rank's failure with all
                    why = f"{type(exc).__name__}: {_first_line(exc)}"
                else:
                    self.log(f"{verb} {path.name} ({progress_text(run)})")
                    return run
            self.log(f"checkpoint {path.name} is not used ({why}); trying the previous one")
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _verified_or_reason(path: Path) -> str | None:
    try:
        verify(path)
        return None
    except CheckpointError as exc:
        return str(exc)


def _agree(decide):
    """Rank 0's ``decide()``, shared with every rank (all ranks then take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_size(path: Path) -> torch.Size:
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    if _RUN_KEY not in meta.state_dict_metadata:
        raise CheckpointError("it holds no run state")
    return meta.state_dict_metadata[_RUN_KEY].size


def _load(path: Path, parts: dict) -> dict:
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    missing = sorted(
        {name for name in parts if not any(k.startswith(name + ".") for k in meta.state_dict_metadata)}
    )
    if missing:
        raise CheckpointError(f"it lacks {', '.join(missing)}")
    state = _state_of(parts)
    state[_RUN_KEY] = torch.empty(_run_size(path), dtype=torch.uint8)
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    run = _decode(state.pop(_RUN_KEY))
    _apply(parts, state)
    return run


def read(path) -> dict:
    """A verified checkpoint as one process's plain dicts, without a process group: ``{"student": {...},
    "teacher": {...}, **run_state}`` (whole CPU tensors under the modules' own names; optimizer state is not
    read). CheckpointError when it does not verify."""
    path = Path(path)
    verify(path)
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    flat = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.state_dict_metadata.items()
        if key.startswith(("student.", "teacher.")) and hasattr(m, "properties")
    }
    flat[_RUN_KEY] = torch.empty(_run_size(path), dtype=torch.uint8)
    with _quiet_dcp():
        dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    out = _decode(flat.pop(_RUN_KEY))
    for which in ("student", "teacher"):
        out[which] = {k[len(which) + 1 :]: v for k, v in flat.items() if k.startswith(which + ".")}
    return out


def read_latest(out, log=lambda line: None, verb: str = "reading") -> dict | None:
    """:func:`read` of the newest checkpoint in ``out`` that verifies (others are reported through ``log`` and
    skipped); None when none does."""
    refuse_old_format(out)
    for path in checkpoints(out):
        try:
            state = read(path)
        except Exception as exc:
            log(f"checkpoint {path.name} is not used ({_first_line(exc)}); trying the previous one")
            continue
        log(f"{verb} {path.name} ({progress_text(state)})")
        return state
    return None


def progress_text(state: dict) -> str:
    """A run state's progress in words: "6 epochs done, step 372" or "5 epochs and 62 batches done, step 372"."""
    epochs, batch, step = state.get("epoch", 0), state.get("batch", 0), state.get("step")
    batches = f" and {batch} batch{'es' if batch != 1 else ''}" if batch else ""
    return f"{epochs} epoch{'s' if epochs != 1 else ''}{batches} done, step {step}"


# ------------------------------------------------------------------------------------------------ the lock
class RunFolderBusy(CheckpointError):
    """Another live process holds the run folder."""


def lock_run_folder(out) -> int:
    """Take the advisory lock of run folder ``out`` (created if needed) for this process's life, and return its
    file descriptor (close it to release early). The OS releases it when the process ends, however it ends, so a
    stale lock never blocks a resume. RunFolderBusy, naming the holder's PID and host, when a live process
    holds it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CheckpointError(f"run folder {str(out)!r} cannot be written ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderBusy(
            f"run folder {str(out)!r} is in use by {holder}: wait for that run or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
    return fd
