"""Checkpoints: the complete training state in one file plus a manifest written last.

A checkpoint directory holds ``state.pt`` and ``manifest.json`` (its size and SHA-256). The
manifest is written after the state, so a copy interrupted half-way has none, or one that does
not match, and is refused by :func:`load_state`: it can never be what a resume loads. States are
read with ``torch.load(weights_only=True)``, because checkpoints read from storage are untrusted.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rsk_dist.config import JobConfig

STATE, MANIFEST = "state.pt", "manifest.json"


class CheckpointError(ValueError):
    pass


def checkpoint_files(state: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The files of a checkpoint of ``state``, (name, contents), in the order they must be
    written: the manifest last."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    manifest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "epoch": state.get("epoch"), "step": state.get("step")}
    return [(STATE, data), (MANIFEST, json.dumps(manifest).encode())]


def cpu_copy(state: Any) -> Any:
    """``state`` with every tensor copied to the CPU: a snapshot that later optimizer steps do
    not change, so that it can be written while training goes on."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Writes ``state`` into a local directory: the state file first, its manifest last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in checkpoint_files(state):
        (directory / name).write_bytes(data)


def write_checkpoint(fs: Any, path: str, state: dict[str, Any]) -> None:
    """Writes ``state`` as a checkpoint directory at ``path`` of a ``pyarrow.fs.FileSystem``
    (Ray Train's storage): the state file first, its manifest last."""
    fs.create_dir(path)
    for name, data in checkpoint_files(state):
        with fs.open_output_stream(f"{path}/{name}") as out:
            out.write(data)


def publish_state(url: str, state: dict[str, Any]) -> None:
    """Writes ``state`` as a checkpoint directory at ``url`` (any fsspec URL), replacing one
    that is there: the old manifest goes first and the new one comes last, so a reader sees
    the old checkpoint, the new one, or a refused incomplete one, never a mix."""
    from rsk_dist.storage import atomic_write, filesystem, join

    fs, path = filesystem(url)
    files = checkpoint_files(state)
    if fs.exists(join(path, MANIFEST)):
        fs.rm_file(join(path, MANIFEST))
    for name, data in files:
        atomic_write(fs, join(path, name), data)


def load_state(url: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads and verifies a checkpoint directory at any fsspec URL or local path."""
    from rsk_dist.storage import filesystem, redact

    fs, path = filesystem(str(url))
    try:
        manifest = json.loads(fs.cat_file(posixpath.join(path, MANIFEST)))
    except FileNotFoundError:
        raise CheckpointError(_not_a_checkpoint(str(url))) from None
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        manifest = None
    if not isinstance(manifest, dict) or type(manifest.get("bytes")) is not int or not isinstance(manifest.get("sha256"), str):
        raise CheckpointError(
            f"{redact(url)}/{MANIFEST} is not a checkpoint manifest (JSON with bytes and sha256): the "
            "directory is damaged or not a checkpoint; resume from an earlier one"
        )
    try:
        # The size first: a state far larger than its manifest says is refused unread.
        size = fs.size(posixpath.join(path, STATE))
        if size != manifest["bytes"]:
            raise CheckpointError(
                f"{redact(url)}: {STATE} does not match its manifest: it is {size} bytes, the manifest says "
                f"{manifest['bytes']} (truncated, altered or overwritten); resume from an earlier checkpoint"
            )
        data = fs.cat_file(posixpath.join(path, STATE))
    except FileNotFoundError:
        # Uploads of a checkpoint's files run on threads in no set order: a manifest can arrive
        # without its state (an upload cut short), which must read as incomplete.
        raise CheckpointError(
            f"{redact(url)} has a {MANIFEST} but no {STATE}: the checkpoint's upload was interrupted "
            "or the state was deleted; resume from an earlier checkpoint"
        ) from None
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise CheckpointError(f"{redact(url)}: {STATE} does not match its manifest (truncated or altered)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        raise CheckpointError(
            f"{redact(url)}: {STATE} matches its manifest but cannot be loaded safely ({type(err).__name__}: "
            f"{str(err)[:300]}); resume from another checkpoint"
        ) from None


def _not_a_checkpoint(url: str) -> str:
    """Why ``url`` (a directory without a manifest) is not a checkpoint, and what to pass instead."""
    from rsk_dist.storage import filesystem, join, redact

    latest = latest_checkpoint(url)
    fs, path = filesystem(url)
    best = join(url, "best") if fs.exists(join(path, "best", MANIFEST)) else None
    if latest or best:
        choices = " or ".join(f"{what} {redact(u)}" for what, u in (("its latest checkpoint", latest), ("its best model", best)) if u)
        return f"{redact(url)} is a run folder, not a checkpoint: pass {choices}"
    if not fs.exists(path):
        return f"{redact(url)} does not exist: pass a checkpoint directory (a run's best/ or one of its checkpoint_epoch_*)"
    return (
        f"{redact(url)} is not a complete checkpoint (no {MANIFEST}): it was interrupted while being "
        "written or is not a checkpoint directory; resume from an earlier one"
    )


def checkpoints(run_url: str) -> list[str]:
    """The URLs of a run directory's checkpoints that have a manifest, oldest first: names
    (``checkpoint_epoch_EEEEE[_step_SSSSS]``) sort in training order."""
    from rsk_dist.storage import filesystem, join

    fs, path = filesystem(run_url)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [join(run_url, n) for n in names if n.startswith("checkpoint_epoch_") and fs.exists(join(path, n, MANIFEST))]


def latest_checkpoint(run_url: str) -> str | None:
    """The URL of a run directory's latest checkpoint with a manifest (unverified), or None."""
    found = checkpoints(run_url)
    return found[-1] if found else None


def latest_state(run_url: str, map_location: str | torch.device = "cpu") -> tuple[str, dict[str, Any]] | None:
    """The run's newest checkpoint that verifies, (URL, state), or None when it has none.
    A newer one that does not verify (damaged, cut-off upload) is passed over with a warning
    naming it: one bad checkpoint must not block a resume from the good ones before it."""
    for url in reversed(checkpoints(run_url)):
        try:
            return url, load_state(url, map_location)
        except CheckpointError as err:
            warnings.warn(f"skipping damaged checkpoint {err}; falling back to the one before it", stacklevel=2)
    return None


def state_config(state: dict[str, Any], url: str) -> JobConfig:
    """The job config a checkpoint's state was trained with, as a clear error when it has none."""
    from pydantic import ValidationError

    from rsk_dist.config import JobConfig
    from rsk_dist.storage import redact

    if not isinstance(state.get("config"), dict):
        raise CheckpointError(
            f"{redact(url)} holds no job config (no 'config' entry): it was not written by rsk-dist's training; "
            "use a checkpoint of a training run"
        )
    try:
        return JobConfig.model_validate(state["config"])
    except ValidationError as err:
        raise CheckpointError(
            f"{redact(url)}: its job config is not valid for this version of rsk-dist ({err.error_count()} "
            f"problem(s), first: {'.'.join(map(str, err.errors()[0]['loc']))}: {err.errors()[0]['msg']})"
        ) from None


def checkpoint_name(epoch: int, step: int) -> str:
    """``epoch`` epochs and ``step`` steps of the next one done."""
    return f"checkpoint_epoch_{epoch:05d}" + (f"_step_{step:05d}" if step else "")


def load_model(url: str, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """The embedding model of a checkpoint, in eval mode, and its job config."""
    from rsk_dist.models import build_model
    from rsk_dist.teacher import map_dim, with_teacher_map

    state = load_state(url, map_location)
    config = state_config(state, url)
    m = config.model
    model = build_model(m.name, dim=m.dim, pooling=m.pooling, pretrained=False, in_channels=m.in_channels,
                        dropout=m.dropout, freeze_bn=m.freeze_bn, width=m.width)
    model = with_teacher_map(model, config, map_dim(state["model"]))
    model.load_state_dict(state["model"])
    return model.eval(), config
