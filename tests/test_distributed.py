"""DistributedDataParallel on 2 CPU processes (gloo): a conditioned UNet trains with conditions present or absent.

`find_unused_parameters=False` is DDP's fast default, and it raises (at the next forward) if any
parameter got no gradient. The conditioned UNet keeps every parameter in the graph whatever is
absent (absent text and images are masked, not skipped), so the same DDP wrapper serves every
batch. Each rank sees different data, so gradients that are identical across ranks prove that
DDP averaged them.
"""

import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from cpcbm_blocks import UNet3D

from .conftest import randomize_
from .test_conditioning import inputs, small_conditioned

WORLD_SIZE = 2
SCENARIOS = ("everything present", "no text", "no images", "nothing present", "mixed per sample")


def _batch(scenario: str, *, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(2, 1, 4, 16, 16, generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    t = torch.randint(0, 1000, (2,), generator=generator)
    conditions = inputs(batch=2, seed=1000 * step + rank)
    if scenario in ("no text", "nothing present"):
        conditions["text_mask"][:] = False
    if scenario in ("no images", "nothing present"):
        conditions["cond_available"][:] = False
    if scenario == "mixed per sample":
        conditions["text_mask"][0] = False
        conditions["cond_available"][1, :2] = False
    return x, t, noise, conditions


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == [], f"parameters without a gradient (DDP would fail at the next step): {unused}"
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                                timeout=timedelta(seconds=120))
        torch.manual_seed(0)
        model = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05)
        reference = randomize_(UNet3D(small_conditioned(text_to_timestep=True)), scale=0.05)  # same weights, no DDP
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=1e-2)
        for step, scenario in enumerate(SCENARIOS):
            x, t, noise, conditions = _batch(scenario, step=step, rank=rank)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(ddp(x, t, **conditions), noise).backward()
            grads = _flat_grads(model)
            assert torch.isfinite(grads).all(), scenario
            gathered = [torch.empty_like(grads) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, grads)
            assert all(torch.equal(gathered[0], other) for other in gathered[1:]), f"{scenario}: ranks disagree"

            # The DDP gradient is the mean of the ranks' local gradients (which differ: different data).
            reference_optimizer.zero_grad()
            torch.nn.functional.mse_loss(reference(x, t, **conditions), noise).backward()
            local = [torch.empty_like(grads) for _ in range(WORLD_SIZE)]
            dist.all_gather(local, _flat_grads(reference))
            assert not torch.equal(local[0], local[1]), f"{scenario}: the ranks saw the same data"
            torch.testing.assert_close(grads, torch.stack(local).mean(0), rtol=1e-4, atol=1e-6)
            optimizer.step()
            with torch.no_grad():  # keep the reference in step with the DDP replica
                for p_ref, p in zip(reference.parameters(), model.parameters(), strict=True):
                    p_ref.copy_(p)
        dist.barrier()
        Path(result_dir, f"rank{rank}.ok").write_text(f"{len(SCENARIOS)} steps")
    except BaseException:
        Path(result_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_on_two_cpu_processes_trains_with_and_without_conditions_and_agrees_across_ranks(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    try:
        mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(results)), nprocs=WORLD_SIZE, join=True)
    except Exception as error:
        errors = "\n".join(p.read_text() for p in sorted(results.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{errors or error}") from None
    assert sorted(p.name for p in results.iterdir()) == ["rank0.ok", "rank1.ok"]
