"""The plain-torch ID table's own optimizers against PyTorch's reference implementations; the initial table,
built block by block, equals the whole table initialised at once, and each TorchRec rank keeps only its rows."""

import os
import socket

import pytest
import torch

from cammsr.layers import init_id_table_
from train.distributed import shutdown
from train.embeddings import TorchItemTable, TorchRecItemTable, initial_blocks, initial_table


def _gradients(steps: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def test_adam_table_matches_torch_adam_and_resumes_exactly():
    weight = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    table = TorchItemTable(weight, "adam", lr=0.01, eps=1e-8, device=torch.device("cpu"))
    reference = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.Adam([reference], lr=0.01, betas=TorchItemTable.ADAM_BETAS, eps=1e-8)
    grads = _gradients(5, tuple(weight.shape))
    for grad in grads[:3]:
        table.weight.grad, reference.grad = grad.clone(), grad.clone()
        table.step()
        optimizer.step()
    torch.testing.assert_close(table.weight.data, reference.data, rtol=1e-6, atol=1e-7)

    resumed = TorchItemTable(torch.zeros_like(weight), "adam", lr=0.01, eps=1e-8, device=torch.device("cpu"))
    resumed.load_sharded_state({k: v.clone() for k, v in table.sharded_state().items()})
    for grad in grads[3:]:
        for t in (table, resumed):
            t.weight.grad = grad.clone()
            t.step()
        reference.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(table.weight.data, reference.data, rtol=1e-6, atol=1e-7)
    assert torch.equal(resumed.weight.data, table.weight.data)
    assert table.footprint()["optimizer_bytes"] == 2 * weight.numel() * 4 + 4  # exp_avg, exp_avg_sq, step count


@pytest.mark.parametrize("init_method", ["normal", "xavier_normal", "xavier_uniform"])
@pytest.mark.parametrize("num_rows,dim", [(1001, 8), (1001, 3), (97, 5), (70, 1)])
def test_initial_blocks_are_the_whole_table_initialised_at_once(init_method, num_rows, dim):
    torch.manual_seed(11)
    whole = torch.empty(num_rows, dim)
    init_id_table_(whole, init_method)
    rng_before = torch.random.get_rng_state()

    blocks = list(initial_blocks(num_rows, dim, seed=11, init_method=init_method, block_rows=32))
    assert len(blocks) > 1
    assert [start for start, _ in blocks] == [sum(b.shape[0] for _, b in blocks[:i]) for i in range(len(blocks))]
    assert torch.equal(torch.cat([block for _, block in blocks]), whole)
    assert torch.equal(initial_table(num_rows, dim, seed=11, init_method=init_method), whole)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # its own generator: the global stream is untouched


def _load_sharded_table(rank: int, world: int, port: int, num_rows: int, dim: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        blocks = initial_blocks(num_rows, dim, seed=5, init_method="normal", block_rows=48)
        table = TorchRecItemTable(num_rows, dim, blocks, "row_wise", "exact_rowwise_adagrad", lr=0.05, eps=1e-8,
                                  device=torch.device("cpu"))
        torch.save({"rows": table.all_rows(), "footprint": table.footprint()}, f"{out}.{rank}")
    finally:
        # the trainer's exit path: a Gloo group (TorchRec's included) still alive at interpreter exit can abort it
        shutdown()


def test_each_rank_keeps_only_its_rows_of_the_initial_table(tmp_path):
    """Blocks of 48 rows cross the row-wise shard boundary: every rank copies its part of each block."""
    num_rows, dim, world = 1001, 8, 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_load_sharded_table, args=(world, port, num_rows, dim, str(tmp_path / "rank")),
                                nprocs=world)
    expected = initial_table(num_rows, dim, seed=5, init_method="normal")
    results = [torch.load(tmp_path / f"rank.{rank}") for rank in range(world)]
    for result in results:
        assert torch.equal(result["rows"], expected)
    assert sorted(r["footprint"]["rows"] for r in results) == [500, 501]
