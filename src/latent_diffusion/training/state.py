"""Training state in one safetensors file: modules, optimizers (FSDP shards gathered), step and RNG, no pickle."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.files.atomic import atomic_path
from latent_diffusion.files.weights import (CheckpointError, is_complete_safetensors, load_module_weights,
                                            load_weights, read_metadata, write_safetensors)

log = logging.getLogger(__name__)


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before `path` is kept (`last.safetensors` → `previous.safetensors`)."""
    path = Path(path)
    return path.with_name("previous" + "".join(path.suffixes))


def save_training_state(path: str | os.PathLike, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], step: int,
                        extra: dict[str, Any] | None = None,
                        state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
                        generators: dict[str, torch.Generator] | None = None,
                        optimizer_states: dict[str, dict[str, Any]] | None = None) -> None:
    """Save modules, optimizers, step and RNG states in one safetensors file, atomically; the file it replaces
    is kept as `previous_path(path)` until the new one is complete. `state_dicts` overrides a module's
    `state_dict()` and `optimizer_states` an optimizer's (e.g. gathered from FSDP shards)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": step, "extra": extra or {}, "optimizers": {}}
    for name, module in modules.items():
        for key, value in (state_dicts or {}).get(name, module.state_dict()).items():
            tensors[f"{name}.{key}"] = value
    for name, optimizer in optimizers.items():
        opt_tensors, opt_meta = _flatten_optimizer((optimizer_states or {}).get(name) or optimizer.state_dict())
        tensors.update({f"optim.{name}.{k}": v for k, v in opt_tensors.items()})
        meta["optimizers"][name] = opt_meta
    tensors["rng.torch"] = torch.get_rng_state()
    for name, generator in (generators or {}).items():
        tensors[f"rng.generator.{name}"] = generator.get_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    # A torn `path` (the run resumed from the previous file) must not replace a readable previous one.
    keep = previous_path(path) if is_complete_safetensors(path) else None
    with atomic_path(path, keep_previous=keep) as tmp:
        write_safetensors(tensors, tmp, path, {"training_state": json.dumps(meta)})


def load_training_state(path: str | os.PathLike, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], restore_rng: bool = True,
                        generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns {'step': int, 'extra': dict}."""
    metadata = read_metadata(path)
    if "training_state" not in metadata:
        raise CheckpointError(f"{path} is a weights file, not a training state (no 'training_state' metadata)")
    meta = json.loads(metadata["training_state"])
    tensors = load_weights(path)
    for name, module in modules.items():
        prefix = f"{name}."
        load_module_weights(module, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                            f"{path} [{name}]")
    for name, optimizer in optimizers.items():
        prefix = f"optim.{name}."
        opt_tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        optimizer.load_state_dict(_like_parameters(optimizer, _unflatten_optimizer(opt_tensors,
                                                                                   meta["optimizers"][name])))
    for name, generator in (generators or {}).items():
        if f"rng.generator.{name}" in tensors:
            generator.set_state(tensors[f"rng.generator.{name}"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
    return {"step": int(meta["step"]), "extra": meta["extra"]}


def resume_training_state(path: str | os.PathLike, modules: dict[str, torch.nn.Module],
                          optimizers: dict[str, torch.optim.Optimizer],
                          generators: dict[str, torch.Generator] | None = None) -> dict[str, Any] | None:
    """Restore the newest readable checkpoint: `path`, or, when it is corrupt or partial, the previous one (a
    warning names the bad file); None when there is none. A checkpoint that doesn't fit the model is an error."""
    candidates = [Path(path), previous_path(path)]
    errors = []
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            metadata = read_metadata(candidate)
            if "training_state" not in metadata:
                raise CheckpointError(f"{candidate} holds no training state")
            load_weights(candidate)  # reads every tensor: a torn file fails here, before any module is touched
        except CheckpointError as exc:
            log.warning("checkpoint %s is unreadable (%s): trying the previous one", candidate, exc)
            errors.append(str(exc))
            continue
        return {**load_training_state(candidate, modules, optimizers, generators=generators), "path": candidate}
    if errors:
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
    return None


def distribute_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole) laid out like `reference`: sharded the same way when `reference` is an FSDP DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(reference, DTensor) and not isinstance(tensor, DTensor) and tensor.shape == reference.shape:
        return distribute_tensor(tensor.to(reference.device), reference.device_mesh, reference.placements)
    return tensor


def _like_parameters(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Whole optimizer moments laid out like their parameters (sharded again when those are FSDP DTensors)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state_dict["state"].items():
        if index < len(params):
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    values[key] = distribute_like(value, params[index])
    return state_dict


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
