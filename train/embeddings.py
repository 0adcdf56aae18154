"""The item-ID table behind one interface, two backends chosen by `embedding.backend` (never a silent fallback):

- "torchrec": an EmbeddingCollection under DistributedModelParallel, sharded by the planner (row_wise by default),
  fused sparse optimizer applied during backward (exact row-wise Adagrad / Adagrad / SGD: they exist on CPU and GPU);
- "torch": a plain nn.Embedding with the same sparse optimizer maths in PyTorch, for one process on machines
  where TorchRec's kernels cannot be installed.

`lookup(item_seq, ids)` returns (sequence rows [B, L, d], rows of `ids`) from ONE lookup, both with gradient:
`ids=None` means all rows [N + 1, d] (the full-softmax candidates), otherwise only the rows a step needs (sampled
softmax: targets + shared negatives), so a step never materialises a 10M-row table. `rows(ids)` is the no-grad
read (evaluation reads the catalogue chunk by chunk); with TorchRec both are collectives (every rank calls them,
the same number of times). `step()` applies the optimizer where it is not fused.
Row 0 (padding) stays zero: sequence rows are masked at padding positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from cammsr.layers import init_table_rows_

FEATURE = "item"
TABLE = "item_id"


INIT_BLOCK_ROWS = 65_536  # a multiple of 16: torch draws normal values 16 at a time (see initial_blocks)


def initial_blocks(num_rows: int, dim: int, seed: int, init_method: str,
                   block_rows: int = INIT_BLOCK_ROWS) -> Iterator[tuple[int, torch.Tensor]]:
    """The initial table as consecutive blocks (first row, rows), never more than one block in memory: a rank keeps
    the rows of its shards only. The values are `init_id_table_` on the whole table after `torch.manual_seed(seed)`,
    identical on every rank and for every world size: torch's CPU normal_ draws uniforms in groups of 16 (the last
    16 values redrawn when the count is no multiple of 16), so blocks of a multiple of 16 values continue one stream."""
    if block_rows <= 0 or block_rows % 16:
        raise ValueError(f"block_rows must be a positive multiple of 16, got {block_rows}")
    starts = list(range(0, num_rows, block_rows))
    if len(starts) > 1 and (num_rows - starts[-1]) * dim < 16:
        starts.pop()  # fewer than 16 values take torch's one-at-a-time path: keep them in the previous block
    generator = torch.Generator().manual_seed(seed)
    for start, end in zip(starts, starts[1:] + [num_rows]):
        block = torch.empty(end - start, dim)
        init_table_rows_(block, init_method, (num_rows, dim), generator)
        if start == 0:
            block[0].zero_()
        yield start, block


def initial_table(num_rows: int, dim: int, seed: int, init_method: str) -> torch.Tensor:
    """The whole initial table (one process holds it all)."""
    weight = torch.empty(num_rows, dim)
    for start, block in initial_blocks(num_rows, dim, seed, init_method):
        weight[start:start + block.shape[0]] = block
    return weight


class TorchItemTable(nn.Module):
    """Plain-torch table with an explicit optimizer: the fused kernels' row-wise maths, or dense Adam (RecBole's
    optimizer for its item table, which the full softmax updates in every row on every step)."""

    backend = "torch"
    ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as RecBole uses them

    def __init__(self, weight: torch.Tensor, optimizer: str, lr: float, eps: float, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().to(device))
        self.optimizer, self.lr, self.eps = optimizer, lr, eps
        if optimizer == "adam":
            self.register_buffer("exp_avg", torch.zeros_like(self.weight))
            self.register_buffer("exp_avg_sq", torch.zeros_like(self.weight))
            # float32 on the table's device: the fused kernel's step count (no host sync to read it)
            self.register_buffer("steps", torch.zeros((), dtype=torch.float32, device=device))
            self._adam = torch.optim.Adam([self.weight], lr=lr, betas=self.ADAM_BETAS, eps=eps, fused=True)
            self._adam.state[self.weight] = {"step": self.steps, "exp_avg": self.exp_avg,
                                             "exp_avg_sq": self.exp_avg_sq}
        else:
            shape = (weight.shape[0],) if optimizer == "exact_rowwise_adagrad" else tuple(weight.shape)
            self.register_buffer("momentum", torch.zeros(shape, device=device))

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def lookup(self, item_seq: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.weight
        return rows[item_seq] * (item_seq != 0)[..., None], rows if ids is None else rows[ids]

    @torch.no_grad()
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].detach()

    @torch.no_grad()
    def all_rows(self) -> torch.Tensor:
        return self.weight.detach().clone()

    def footprint(self) -> dict:
        """This process's share of the table: rows, bytes of the rows and of the optimizer state."""
        return {"rows": self.num_rows, "table_bytes": self.weight.numel() * self.weight.element_size(),
                "optimizer_bytes": sum(b.numel() * b.element_size() for b in self.buffers())}

    @torch.no_grad()
    def step(self) -> None:
        grad = self.weight.grad
        if grad is None:
            return
        if self.optimizer == "adam":
            self._adam.step()
        elif self.optimizer == "exact_sgd":
            self.weight -= self.lr * grad
        elif self.optimizer == "exact_adagrad":
            self.momentum += grad * grad
            self.weight -= self.lr * grad / (self.momentum.sqrt() + self.eps)
        else:
            self.momentum += (grad * grad).mean(dim=1)
            self.weight -= (self.lr / (self.momentum.sqrt() + self.eps))[:, None] * grad
        self.weight.grad = None

    def sharded_state(self) -> dict:
        return {"weight": self.weight.data, **dict(self.named_buffers())}

    @torch.no_grad()
    def load_sharded_state(self, state: dict) -> None:
        self.weight.copy_(state["weight"])
        for name, buffer in self.named_buffers():
            buffer.copy_(state[name])

    def weight_state(self) -> dict:
        """The part of sharded_state that scores: the rows, without the optimizer's state."""
        return {"weight": self.weight.data}

    @torch.no_grad()
    def load_weight_state(self, state: dict) -> None:
        self.weight.copy_(state["weight"])


class _Collection(nn.Module):
    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=TABLE, embedding_dim=dim, num_embeddings=num_rows,
                                    feature_names=[FEATURE])],
            device=torch.device("meta"))

    def forward(self, features):
        return self.ec(features)


class TorchRecItemTable(nn.Module):
    """EmbeddingCollection sharded with DistributedModelParallel; the fused optimizer updates it in backward."""

    backend = "torchrec"

    def __init__(self, num_rows: int, dim: int, blocks: Iterable[tuple[int, torch.Tensor]], sharding: str,
                 optimizer: str, lr: float, eps: float, device: torch.device):
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
        from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
        from torchrec.distributed.types import ShardingEnv

        self.num_rows, self.dim = num_rows, dim
        self.device = device
        optim = {"exact_rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                 "exact_adagrad": EmbOptimType.EXACT_ADAGRAD, "exact_sgd": EmbOptimType.EXACT_SGD}[optimizer]
        fused = {"optimizer": optim, "learning_rate": lr}
        if optimizer != "exact_sgd":
            fused["eps"] = eps
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        world = dist.get_world_size()
        compute = "cuda" if device.type == "cuda" else "cpu"
        local_world = int(__import__("os").environ.get("LOCAL_WORLD_SIZE", world))
        topology = TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=local_world),
                                                   kernel_config=KernelConfig(compute_device=compute))
        constraints = {TABLE: ParameterConstraints(sharding_types=[sharding],
                                                   compute_kernels=[EmbeddingComputeKernel.FUSED.value])}
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                           storage_reservation=FixedPercentageStorageReservation(percentage=0.05))
        module = _Collection(self.num_rows, self.dim)
        plan = planner.collective_plan(module, [sharder], dist.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                            device=device, plan=plan, sharders=[sharder],
                                            init_data_parallel=False)
        self.plan = plan
        self._load_initial(blocks)

    def _shards(self):
        return [v for k, v in self.dmp.state_dict().items() if k.endswith("weight")]

    @torch.no_grad()
    def _load_initial(self, blocks: Iterable[tuple[int, torch.Tensor]]) -> None:
        """Copy the rows of the initial table's blocks that fall in this rank's shards (live views); the rest of
        each block is dropped, so no rank ever holds the whole table."""
        shards = [shard for sharded in self._shards() for shard in sharded.local_shards()]
        for start, block in blocks:
            end = start + block.shape[0]
            for shard in shards:
                row, col = shard.metadata.shard_offsets
                rows, cols = shard.metadata.shard_sizes
                first, last = max(start, row), min(end, row + rows)
                if first < last:
                    shard.tensor[first - row:last - row].copy_(
                        block[first - start:last - start, col:col + cols].to(shard.tensor.device))

    def _lookup(self, item_seq: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One KJT of two bags (the sequence ids, then `ids`) through the sharded collection."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        values = torch.cat([item_seq.reshape(-1), ids.reshape(-1)])
        lengths = torch.tensor([item_seq.numel(), ids.numel()], device=values.device, dtype=torch.int64)
        features = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=values, lengths=lengths)
        rows = self.dmp(features)[FEATURE].values()
        return rows[: item_seq.numel()], rows[item_seq.numel():]

    def lookup(self, item_seq: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is None:
            ids = torch.arange(self.num_rows, device=item_seq.device)
        seq, rows = self._lookup(item_seq, ids)
        return seq.view(*item_seq.shape, self.dim) * (item_seq != 0)[..., None], rows

    @torch.no_grad()
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of `ids` on every rank (a collective: every rank must call it)."""
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        return self._lookup(empty, ids.to(self.device))[1].detach()

    @torch.no_grad()
    def all_rows(self) -> torch.Tensor:
        """The full table on every rank (a collective: every rank must call it)."""
        return self.rows(torch.arange(self.num_rows, device=self.device)).clone()

    def footprint(self) -> dict:
        """This rank's share of the table: rows, bytes of its shards and of their fused optimizer state."""
        rows = table_bytes = optimizer_bytes = 0
        for sharded in self._shards():
            for shard in sharded.local_shards():
                rows += shard.metadata.shard_sizes[0] if shard.metadata.shard_offsets[1] == 0 else 0
                table_bytes += shard.tensor.numel() * shard.tensor.element_size()
        for state in self.dmp.fused_optimizer.state_dict()["state"].values():
            for value in state.values():
                for tensor in (value.local_shards() if hasattr(value, "local_shards") else [value]):
                    tensor = getattr(tensor, "tensor", tensor)
                    if isinstance(tensor, torch.Tensor):
                        optimizer_bytes += tensor.numel() * tensor.element_size()
        return {"rows": rows, "table_bytes": table_bytes, "optimizer_bytes": optimizer_bytes}

    def step(self) -> None:
        pass  # fused into backward

    def sharded_state(self) -> dict:
        """ShardedTensors of the table and its optimizer state, for torch.distributed.checkpoint."""
        return {"model": self.dmp.state_dict(), "optim": self.dmp.fused_optimizer.state_dict()}

    def load_sharded_state(self, state: dict) -> None:
        self.load_weight_state(state)
        self.dmp.fused_optimizer.load_state_dict(state["optim"])

    def weight_state(self) -> dict:
        """The part of sharded_state that scores: the table's shards, without the fused optimizer's state."""
        return {"model": self.dmp.state_dict()}

    def load_weight_state(self, state: dict) -> None:
        self.dmp.load_state_dict(state["model"])


def build_item_table(num_items: int, dim: int, backend: str, sharding: str, optimizer: str, lr: float,
                     eps: float, seed: int, init_method: str, device: torch.device):
    if backend == "torch":
        return TorchItemTable(initial_table(num_items + 1, dim, seed, init_method), optimizer, lr, eps, device)
    return TorchRecItemTable(num_items + 1, dim, initial_blocks(num_items + 1, dim, seed, init_method), sharding,
                             optimizer, lr, eps, device)


def describe_plan(table) -> str:
    if table.backend == "torch":
        return "torch nn.Embedding (1 process)"
    return str(table.plan).strip()


__all__ = ["build_item_table", "TorchItemTable", "TorchRecItemTable", "describe_plan"]
