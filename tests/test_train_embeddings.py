"""The plain-torch ID table's own optimizers against PyTorch's reference implementations."""

import torch

from train.embeddings import TorchItemTable


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
