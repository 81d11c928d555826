"""Megatron-style tensor parallelism: the TP group and the two parallel linear layers.

Layers receive their `TPGroup`; nothing reads a global. Column-parallel layers hold a slice of
the output features (no communication); row-parallel layers hold a slice of the input features
and sum the partial products across the group (one all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kvxfer.errors import ConfigError


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group. `group` is None for TP 1."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> TPGroup:
        return cls(0, 1, None)

    @classmethod
    def init(cls, *, rank: int, size: int, init_method: str, backend: str = "gloo",
             timeout_s: float = 120.0) -> TPGroup:
        """Join (and create) the default process group, e.g. `init_method="tcp://127.0.0.1:29500"`.

        backend: "gloo" on CPU, "nccl" on CUDA (rank r takes GPU r; with fewer GPUs than ranks
        use "gloo", which also reduces CUDA tensors). Every rank of the group must call this.
        """
        if not 0 <= rank < size:
            raise ConfigError(f"rank={rank} outside [0, {size})")
        if size == 1:
            return cls.single()
        if backend == "nccl":  # one GPU per rank, chosen before NCCL binds a communicator
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
        return cls(rank, size, dist.group.WORLD)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows]^T (+ b[rows]): each rank computes its slice of the output features."""

    def __init__(self, in_features: int, out_local: int, *, bias: bool, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_local, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out_local]
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local @ W[:, cols]^T: the input features are split, outputs summed."""

    def __init__(self, in_local: int, out_features: int, *, group: TPGroup) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_local), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_local] -> [T, out] (summed over the group)
        return self.group.all_reduce(nn.functional.linear(x, self.weight))
