"""The memory pre-flight: everything a run will allocate, by where it lives, checked against what is
free before the first large allocation.

Host RAM holds the streamed layers (pinned at their exact size, see ``pinned.py``), the tensors of the
layer being loaded (read from the checkpoint, cast, and for GGUF the next layer read ahead), and, when
the device is the CPU, everything else too. The GPU holds the resident weights, the ring of streamed
layers, the KV pools (the LLM's and each SSM's), the SSMs and the activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from offload_infer.models.base import FamilyConfig


class OffloadPlanError(ValueError):
    """The model cannot run within the memory it was given."""


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def weight_bytes(config: FamilyConfig, dtype: torch.dtype) -> int:
    """Every weight of a model at ``dtype``."""
    shapes = [*config.global_shapes().values()] + [*config.layer_shapes().values()] * config.n_layers
    return sum(math.prod(s) for s in shapes) * element_size(dtype)


def layer_source_bytes(config: FamilyConfig, dtype: torch.dtype) -> int:
    """One decoder layer's tensors at ``dtype``: what loading holds on the host per layer in flight."""
    return sum(math.prod(s) for s in config.layer_shapes().values()) * element_size(dtype)


def kv_pool_bytes(config: FamilyConfig, dtype: torch.dtype, slots: int) -> int:
    """A KV pool of ``slots`` token slots (keys and values of every layer)."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * slots * element_size(dtype)


def available_host_bytes() -> int:
    """Available RAM, within this process's cgroup limit when there is one."""
    import psutil

    avail = psutil.virtual_memory().available
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_file).read().strip()
            if limit != "max" and int(limit) < 2**60:
                avail = min(avail, int(limit) - int(open(usage_file).read().strip()))
            break
        except (OSError, ValueError):
            continue
    return avail


@dataclass
class Footprint:
    """Named byte counts on the host and on the device."""

    host: dict[str, int] = field(default_factory=dict)
    device: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int, device: torch.device) -> None:
        """Counts ``nbytes`` where ``device`` keeps them (the host for the CPU)."""
        where = self.device if device.type == "cuda" else self.host
        where[name] = where.get(name, 0) + nbytes

    def merged(self, other: Footprint) -> Footprint:
        out = Footprint(dict(self.host), dict(self.device))
        for src, dst in ((other.host, out.host), (other.device, out.device)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        return out


def _breakdown(items: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 1e9:.2f}" for k, v in items.items() if v)


def check_footprint(fp: Footprint, device: torch.device, hint_host: str = "", hint_device: str = "") -> None:
    """Raise ``OffloadPlanError`` with the breakdown when the host's available RAM or the GPU's free
    memory is less than the footprint asks for."""
    need = sum(fp.host.values())
    host = available_host_bytes()
    if need > host:
        raise OffloadPlanError(f"this needs {need / 1e9:.2f} GB of host RAM ({_breakdown(fp.host)}); "
                               f"{host / 1e9:.2f} GB is available{hint_host}")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = sum(fp.device.values())
        if need > free:
            raise OffloadPlanError(f"this needs {need / 1e9:.2f} GB of GPU memory ({_breakdown(fp.device)}); "
                                   f"{free / 1e9:.2f} GB is free{hint_device}")


def resident_footprint(name: str, config: FamilyConfig, dtype: torch.dtype, device: torch.device,
                       kv_slots: int) -> Footprint:
    """A model loaded whole onto ``device`` with a KV pool of ``kv_slots``: its weights and pool there,
    one layer's tensors on the host while it loads."""
    fp = Footprint(host={f"loading {name}": layer_source_bytes(config, dtype)})
    fp.add(f"{name} weights", weight_bytes(config, dtype), device)
    fp.add(f"{name} KV cache", kv_pool_bytes(config, dtype, kv_slots), device)
    return fp
