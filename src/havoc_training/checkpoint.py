"""Training checkpoints: model and optimizer through torch.distributed.checkpoint (sharded under FSDP2),
plus the schedule step, the data position and each rank's RNG state. DCP reshards on load, and the
data position counts items of global batches, so a checkpoint resumes with any number of processes.

A checkpoint is written under `.step-NNNNNN.partial` and renamed to `step-NNNNNN` once complete.
Its last file, checksums.json, holds the size and sha256 of every other file: it marks completion,
and resume and export verify it, so flipped or missing bytes are named, never trained on. The last
`keep_last` are kept; an old one is renamed to `.step-NNNNNN.deleting` before it is deleted, so a
kill mid-deletion never leaves a half checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
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
from havoc_core.tokenizer.tokenizer import TOKENIZER_FILE
from havoc_training.lora import merged

STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"
LOADER_FILE = "loader.json"
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


def read_json(path: Path, what: str):
    """The JSON in `path`; a missing or torn file is an error naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is torn or corrupted ({e}); use an earlier checkpoint") from None


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (complete: checksums.json was written)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / CHECKSUMS_FILE).exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _share(path: Path, rank: int, world_size: int) -> list[Path]:
    """This rank's share of a checkpoint's files: the ranks hash (and verify) in parallel."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    return files[rank::world_size]


def verify_checkpoint(path: Path) -> None:
    """Raise a ValueError naming the first file of `path` that is missing, of another size, or
    whose bytes differ from checksums.json. Under torchrun each rank checks its share."""
    rank, world_size = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    problem = None
    try:
        expected = read_json(path / CHECKSUMS_FILE, "checkpoint checksums")
        for name, entry in sorted(expected.items())[rank::world_size]:
            file = path / name
            if not file.is_file():
                problem = f"{file} is missing"
            elif file.stat().st_size != entry["bytes"]:
                problem = f"{file} has {file.stat().st_size} bytes, the checksums say {entry['bytes']} (truncated?)"
            elif _sha256(file) != entry["sha256"]:
                problem = f"{file} does not match its checksum: its bytes were changed or corrupted"
            if problem:
                break
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"{path / CHECKSUMS_FILE} cannot be read ({e})"
    if dist.is_initialized():
        problems = [None] * world_size
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")


def _write_checksums(tmp: Path, rank: int, world_size: int) -> None:
    mine = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _share(tmp, rank, world_size)}
    if dist.is_initialized():
        shares = [None] * world_size
        dist.all_gather_object(shares, mine)
        mine = {k: v for share in shares for k, v in share.items()}
    if rank == 0:
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(mine, indent=2, sort_keys=True))


def _delete(path: Path) -> None:
    """Delete a checkpoint folder, first renaming it to a name `checkpoints()` never lists."""
    doomed = path.with_name(f".{path.name}.deleting")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(root: Path, step: int, model, optimizers, loader, model_config: HavocConfig,
                    keep_last: int, extra: dict) -> Path:
    rank, world_size = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in root.glob(".step-*.deleting"):  # a deletion a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizers)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-rank{rank}.pt")
        if rank == 0:  # the data position is the same on every rank
            (tmp / LOADER_FILE).write_text(json.dumps(loader.state_dict()))
            state = {"step": step, "world_size": world_size, "model_config": model_config.to_dict(), **extra}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _barrier()
        _write_checksums(tmp, rank, world_size)  # last: marks completion
        if rank == 0:
            if final.exists():  # a re-run reaching the same step replaces its own older copy
                _delete(final)
            tmp.rename(final)
            for old in checkpoints(root)[:-keep_last]:
                _delete(old)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(root)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise OSError(f"could not save the checkpoint for step {step} ({e}); {kept}") from None
    _barrier()
    return final


def load_checkpoint(path: Path, model, optimizers, loader, model_config: HavocConfig) -> dict:
    """Restore everything `save_checkpoint` wrote (check it with `verify_checkpoint` first); returns the
    trainer state (step, ...)."""
    state = read_json(path / STATE_FILE, "trainer state")
    saved = HavocConfig.from_dict(state["model_config"])
    if saved != model_config:
        now = model_config.to_dict()
        diffs = [f"{k}: checkpoint {v!r}, now {now[k]!r}" for k, v in saved.to_dict().items() if now[k] != v]
        raise ValueError(f"checkpoint {path} is of another model shape ({'; '.join(diffs)})")
    if not (path / LOADER_FILE).exists() and (path / "loader-rank0.json").exists():
        raise ValueError(f"checkpoint {path} was written by an older HAVOC, whose data position depends on the number "
                         "of processes: resume it with that version, or start a new run with init_from")
    model_state, optim_state = get_state_dict(model, optimizers)
    target = {"model": model_state, "optimizer": optim_state}
    _check_metadata(path)
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    loader.load_state_dict(read_json(path / LOADER_FILE, "data position"))
    # Each rank continues its own random stream; with more processes than wrote the checkpoint, the
    # new ranks take those of the old ones in turn (the ranks' streams start equal: one seed).
    rng = torch.load(path / f"rng-rank{_rank() % state['world_size']}.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def export_checkpoint(path: str | Path, out: str | Path, tokenizer: str | Path | None = None,
                      dtype: str | None = None) -> Path:
    """Write a training checkpoint as a `save_pretrained` folder (config.json + model.safetensors)
    with its tokenizer: `tokenizer`, or the one the checkpoint recorded.

    The weights are read from the DCP files one tensor at a time and cast to `dtype` (default: the
    run's compute dtype, so bf16 for a GPU run), LoRA adapters folded in on the way: the peak is the
    exported model plus one fp32 tensor, and no model is ever built with random weights."""
    from havoc_core.model import HavocModel
    from havoc_core.model.transformer import resolve_dtype
    from havoc_core.tokenizer import HavocTokenizer

    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    verify_checkpoint(path)
    state = read_json(path / STATE_FILE, "trainer state")
    tokenizer_dir = Path(tokenizer or state.get("tokenizer", ""))
    if not (tokenizer_dir / TOKENIZER_FILE).exists():
        where = f"--tokenizer {tokenizer}" if tokenizer else f"the checkpoint's tokenizer {state.get('tokenizer')}"
        raise FileNotFoundError(f"{where} has no {TOKENIZER_FILE} (moved or deleted?); pass --tokenizer with the "
                                "folder the model was trained with")
    loaded = HavocTokenizer.load(tokenizer_dir)
    recorded = state.get("tokenizer_sha256")
    if recorded and loaded.sha256 != recorded:
        raise ValueError(f"{tokenizer_dir} is not the tokenizer the checkpoint was trained with (sha256 "
                         f"{loaded.sha256[:12]}..., trained with {recorded[:12]}...)")
    out_dtype = resolve_dtype(dtype or state.get("dtype", "float32"), "cpu")
    with torch.device("meta"):  # names and shapes only
        model = HavocModel(HavocConfig.from_dict(state["model_config"]))
    _check_metadata(path)
    lora = state.get("lora")
    weights = {}
    for name, like in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensor = _read_tensor(path, name, like.shape)
        module = name.removesuffix(".weight")
        if lora and module.rsplit(".", 1)[-1] in lora["targets"] and name.endswith(".weight"):
            a = _read_tensor(path, f"{module}.lora_A", (lora["rank"], tensor.shape[1]))
            b = _read_tensor(path, f"{module}.lora_B", (tensor.shape[0], lora["rank"]))
            tensor = merged(tensor, a, b, lora["alpha"] / lora["rank"])  # the export is a plain model
        weights[name] = tensor.to(out_dtype)
    if model.config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        loaded.save(tmp)  # a served model needs its tokenizer beside it
    return Path(out)


def _read_tensor(path: Path, name: str, shape) -> torch.Tensor:
    """One fp32 model tensor of a DCP checkpoint (resharded: any number of writers, one reader)."""
    tensor = torch.empty(tuple(shape), dtype=torch.float32)
    dcp.load({"model": {name: tensor}}, checkpoint_id=str(path))
    return tensor
