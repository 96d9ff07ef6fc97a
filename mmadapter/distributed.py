"""The process group of a `torchrun` launch, reduced to what training needs.

Gloo on CPU, NCCL on GPU. In a single process every method is a no-op, so the training loop
has one code path. By default every process holds the whole frozen base and the adapter gradients
are summed with one all-reduce; `shard_layers` (FSDP) splits the layer weights across processes for
bases too big for one device.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created_group: bool = False  # we joined the group, so we leave it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: Any = None) -> Tensor:
        """Sum (or `op`) over processes, returned on the tensor's device."""
        if self.world == 1:
            return tensor
        moved = tensor.to(self.comm_device)
        dist.all_reduce(moved, op=op or dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def sum_gradients(self, params: list[nn.Parameter], loss_sum: Tensor) -> Tensor:
        """Sum the gradients of `params` (and the loss) over processes with one flat all-reduce.

        A parameter that no process used this step (the projector in a step without images) keeps
        grad None, so the optimizer skips it exactly as a single process would.
        """
        if self.world == 1:
            return loss_sum
        device = loss_sum.device
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        used = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = self.all_reduce(torch.cat([*parts, used, loss_sum.reshape(1).float()]))
        offset = 0
        for i, p in enumerate(params):
            grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = grad.clone() if flat[-1 - len(params) + i] > 0 else None
            offset += p.numel()
        return flat[-1]

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (stop requests, failed writes)."""
        return bool(self.all_reduce(torch.tensor([float(flag)])).item() > 0)

    def barrier(self) -> None:
        """Wait until every process has finished its collectives (before the group is taken down)."""
        if self.world > 1:
            dist.barrier()

    def broadcast(self, tensor: Tensor) -> None:
        """Overwrite `tensor` in place with rank 0's values."""
        if self.world > 1:
            moved = tensor.to(self.comm_device)
            dist.broadcast(moved, src=0)
            tensor.copy_(moved)

    def shard_layers(self, layers: nn.ModuleList, device: torch.device) -> None:
        """FSDP over all processes: each keeps 1/world of every layer's attention and MLP weights, and
        a layer's weights are gathered just for its forward and backward. The adapter, embeddings and
        norms stay whole on every process (small), so its gradients are still summed by `all_reduce`.

        `project_prompt` gathers W_k/W_v like a forward: the prompt K/V are computed outside the layer
        call. Layers may arrive on the CPU; their shards move to `device`.
        """
        if self.world == 1:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # FSDP warns when a sharded module returns a view (Linear outputs of 3-D inputs, the prompt K/V),
        # since an in-place op on it would skip the all-gather. Our blocks only use those outputs
        # out of place (h = x + attention(...), matmuls), so the warning does not apply here.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
        mesh = init_device_mesh(device.type, (self.world,))
        for layer in layers:  # each part its own root: True, not the default, or a root keeps its gathered weights
            fully_shard(layer.attention, mesh=mesh, reshard_after_forward=True)
            register_fsdp_forward_method(layer.attention, "project_prompt")
            fully_shard(layer.feed_forward, mesh=mesh, reshard_after_forward=True)
        layers.to(device)  # the norms; the sharded weights are there already

    @staticmethod
    def local_bytes(module: nn.Module) -> int:
        """Bytes of parameters this process holds (its shards, under FSDP)."""
        total = 0
        for p in module.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard under FSDP
            total += t.numel() * t.element_size()
        return total

    @classmethod
    def setup(cls, device: torch.device) -> Distributed:
        """Join the torchrun process group when WORLD_SIZE > 1, or use one the caller initialised."""
        created = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            created = True
        if not dist.is_initialized():
            return cls()
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), comm, created)

    def close(self) -> None:
        if self.created_group:
            dist.destroy_process_group()
            self.created_group = False
