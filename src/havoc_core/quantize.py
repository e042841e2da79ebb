"""Weight-only quantization through torchao: int8 per output channel, int4 in groups of 32.

The linear layers' weights become torchao tensors whose matmuls run torchao's kernels (aten's
`_weight_int8pack_mm`, and tinygemm's int4 kernel for the CPU or CUDA); activations, norms, the
embedding lookup and the KV cache stay in bfloat16. `HavocModel.save_pretrained` writes such a
model as safetensors through torchao's own flattening (`flatten`: tensors plus JSON metadata,
nothing unpickled) and quantization.json (`describe`), so a quantized folder loads without
quantizing again.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZE = 32  # llama.cpp's q4_0 block; tinygemm takes 32, 64 or 128
QUANTIZATION_NAME = "quantization.json"


def _torchao():
    """torchao, imported quietly: a CPU build of torch cannot load its CUDA extensions (none of
    which these schemes use), and each failure would print a warning."""
    # And torch.compile asks its tensors for a cache hash they do not define, warning each time.
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching")
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.prototype.quantization.int4
        import torchao.prototype.safetensors.safetensors_support
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return torchao


def check_scheme(scheme: str | None, dtype: torch.dtype) -> None:
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if dtype != torch.bfloat16:
        # torchao's int4 kernels take bfloat16 only; on the CPU its int8 kernel is ~11x slower in fp32.
        raise ValueError(f"quantized weights compute in bfloat16, not {dtype}: leave --dtype unset or "
                         "pass --dtype bfloat16")


def quantizable(module: nn.Module, scheme: str) -> bool:
    """Whether torchao's kernel for `scheme` holds this layer: tinygemm's int4 needs in_features in
    whole groups and out_features a multiple of 16. Others stay in bfloat16."""
    if not isinstance(module, nn.Linear):
        return False
    return scheme == "int8" or (module.in_features % INT4_GROUP_SIZE == 0 and module.out_features % 16 == 0)


def _config(scheme: str, device: torch.device):
    torchao = _torchao()
    if scheme == "int8":
        return torchao.quantization.Int8WeightOnlyConfig()
    if device.type == "cpu":
        return torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    return torchao.quantization.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


@torch.no_grad()
def quantize(model: nn.Module, scheme: str) -> None:
    """Quantize `model`'s linear weights in place (a bfloat16 model); layers the kernel cannot hold
    stay bfloat16 (`describe` lists them). A tied LM head gets a quantized copy of its own: the
    embedding lookup keeps the bfloat16 matrix."""
    weight = model.embed_tokens.weight
    check_scheme(scheme, weight.dtype)
    if model.lm_head.weight is weight:
        model.lm_head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    _torchao().quantization.quantize_(model, _config(scheme, weight.device),
                                      filter_fn=lambda module, _: quantizable(module, scheme))


_SCHEME_OF = {"Int8Tensor": "int8", "Int4OpaqueTensor": "int4", "Int4TilePackedTo4dTensor": "int4"}


def describe(model: nn.Module) -> dict | None:
    """What quantization.json records for a quantized model (None when no weight is quantized)."""
    kinds = {type(p).__name__ for p in model.parameters()} & set(_SCHEME_OF)
    if not kinds:
        return None
    schemes = {_SCHEME_OF[kind] for kind in kinds}
    if len(schemes) > 1:
        raise ValueError(f"the model mixes {' and '.join(sorted(schemes))} weights; one scheme per model")
    scheme = schemes.pop()
    recorded = {"scheme": scheme, "device": model.embed_tokens.weight.device.type,
                "torchao": _torchao().__version__,
                "bfloat16_layers": [name for name, module in model.named_modules()
                                    if isinstance(module, nn.Linear) and type(module.weight).__name__ not in _SCHEME_OF]}
    if scheme == "int4":
        recorded["group_size"] = INT4_GROUP_SIZE
    return recorded


def quantization_of(directory: str | os.PathLike) -> dict | None:
    """The quantization a `save_quantized` folder records, or None for a plain folder."""
    path = Path(directory) / QUANTIZATION_NAME
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}): write the folder again with `havoc quantize`") from None
    if not isinstance(recorded, dict) or recorded.get("scheme") not in SCHEMES or "device" not in recorded:
        raise ValueError(f"{path} does not name a scheme ({', '.join(SCHEMES)}) and a device: "
                         "write the folder again with `havoc quantize`")
    return recorded


def _allow_int4_cpu_layout(torchao) -> None:
    """torchao 0.18's safetensors allow-list has its CUDA int4 layout but not the CPU one, which
    follows the same protocol (tensor_data_names / tensor_attribute_names)."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.prototype.safetensors import safetensors_utils

    safetensors_utils.ALLOWED_CLASSES.setdefault("Int4OpaqueTensor", Int4OpaqueTensor)
    if "Int4OpaqueTensor" not in safetensors_utils.ALLOWED_TENSORS_SUBCLASSES:
        safetensors_utils.ALLOWED_TENSORS_SUBCLASSES.append("Int4OpaqueTensor")


def flatten(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict with torchao tensors as plain tensors and safetensors metadata."""
    torchao = _torchao()
    _allow_int4_cpu_layout(torchao)
    return torchao.prototype.safetensors.safetensors_support.flatten_tensor_state_dict(state)


def unflatten(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> dict[str, torch.Tensor]:
    torchao = _torchao()
    _allow_int4_cpu_layout(torchao)
    try:
        state, leftover = torchao.prototype.safetensors.safetensors_support.unflatten_tensor_state_dict(tensors, metadata)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{source} does not hold torchao tensors that can be rebuilt ({e}): "
                         "write the folder again with `havoc quantize`") from None
    if leftover:
        raise ValueError(f"{source} has tensors its metadata does not describe: {', '.join(sorted(leftover)[:8])}")
    return state
