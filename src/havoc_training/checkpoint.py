"""Training checkpoints: model and optimizer through torch.distributed.checkpoint (sharded under FSDP2),
plus the schedule step, each rank's RNG state and data position.

A checkpoint is written under `.step-NNNNNN.partial` and renamed to `step-NNNNNN` once complete
(trainer_state.json, written last, marks completion), so a save killed halfway never harms the
previous checkpoint. The last `keep_last` are kept.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from havoc_core.atomic import atomic_directory
from havoc_core.config import HavocConfig
from havoc_core.tokenizer.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from havoc_training.lora import apply_lora, merge_lora

STATE_FILE = "trainer_state.json"
# One process without a process group is a normal way to run, not something to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_NAME = re.compile(r"^step-(\d{6,})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# torch.distributed.checkpoint reads its .metadata file with plain pickle. Before it does, the file
# is unpickled here with only the classes such metadata holds, so a crafted checkpoint runs no code.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of its dataclasses
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _METADATA_GLOBALS.get(module, set())
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if allowed is None or name in allowed or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in checkpoint metadata")


def _check_metadata(path: Path) -> None:
    metadata = path / ".metadata"
    try:
        with open(metadata, "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{metadata} is missing: {path} is not a complete checkpoint") from None
    except Exception as e:
        raise ValueError(f"refusing checkpoint {path}: its .metadata is not plain checkpoint metadata ({e})") from None


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(root: Path, step: int, model, optimizer, loader, model_config: HavocConfig,
                    keep_last: int, extra: dict) -> Path:
    rank, world_size = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-rank{rank}.pt")
        (tmp / f"loader-rank{rank}.json").write_text(json.dumps(loader.state_dict()))
        _barrier()
        if rank == 0:
            state = {"step": step, "world_size": world_size, "model_config": model_config.to_dict(), **extra}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():  # a re-run reaching the same step replaces its own older copy
                shutil.rmtree(final)
            tmp.rename(final)
            for old in checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(root)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(f"could not save the checkpoint for step {step} ({e}); {kept}") from None
    _barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, loader, model_config: HavocConfig) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, ...)."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = HavocConfig.from_dict(state["model_config"])
    if saved != model_config:
        now = model_config.to_dict()
        diffs = [f"{k}: checkpoint {v!r}, now {now[k]!r}" for k, v in saved.to_dict().items() if now[k] != v]
        raise ValueError(f"checkpoint {path} is of another model shape ({'; '.join(diffs)})")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if state["world_size"] != world_size:
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes; resume with the same "
                         f"number (now {world_size}) so that each rank continues its own data")
    model_state, optim_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optimizer": optim_state}
    _check_metadata(path)
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    rank = _rank()
    loader.load_state_dict(json.loads((path / f"loader-rank{rank}.json").read_text()))
    rng = torch.load(path / f"rng-rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a training checkpoint as a `save_pretrained` folder (config.json + model.safetensors)."""
    from havoc_core.model import HavocModel

    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    model = HavocModel(HavocConfig.from_dict(state["model_config"]))
    if "lora" in state:
        apply_lora(model, state["lora"]["rank"], state["lora"]["alpha"], state["lora"]["targets"])
    target = {"model": model.state_dict()}
    _check_metadata(path)
    dcp.load(target, checkpoint_id=str(path))  # reshards: any number of writers, one reader
    model.load_state_dict(target["model"])
    if "lora" in state:
        merge_lora(model)  # the export is a plain model with the adapters folded in
    tokenizer = Path(state.get("tokenizer", ""))
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):  # a served model needs its tokenizer beside it
            if (tokenizer / name).exists():
                shutil.copy(tokenizer / name, tmp / name)
    return Path(out)
