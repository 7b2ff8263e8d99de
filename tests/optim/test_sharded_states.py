"""8-bit optimizers on FSDP2-style DTensor parameters (Shard(0) over a 1-D mesh), two CPU ranks
over gloo: the states are those of each rank's shard alone, state_dict() holds them as DTensors,
and a save/load through torch.distributed.checkpoint resumes bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bytetune.kernels.blockwise import n_blocks
from bytetune.optim import AdamW8bit, Lion8bit

# 257 rows split 129 / 128: the ranks' shards differ in size and end inside a 256-element block;
# the small parameter keeps 32-bit states (fewer than min_8bit_size elements).
SHAPES = [(257, 33), (5, 3)]
OPTIMIZERS = [(AdamW8bit, dict(lr=1e-2, weight_decay=0.1)), (Lion8bit, dict(lr=1e-3, weight_decay=0.1))]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _by_name(state_dict: dict) -> dict:
    # torch.distributed.checkpoint restores the ints of a state (the step count) only under string
    # keys, so the state is keyed by name, as the trainer does (parameter FQNs)
    return {**state_dict, "state": {str(k): v for k, v in state_dict["state"].items()}}


def _rank_main(rank: int, init_file: str, checkpoint_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=gen) for shape in SHAPES]
    for index, (cls, kwargs) in enumerate(OPTIMIZERS):
        sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in full]
        # the reference: this rank's shards as plain tensors, each with its own optimizer state
        alone = [torch.nn.Parameter(p.to_local().clone()) for p in sharded]
        opt, ref = cls(sharded, **kwargs), cls(alone, **kwargs)

        def step(params, optimizer, number, as_dtensor):
            for p, g in zip(params, _grads(number)):
                shard = distribute_tensor(g, mesh, [Shard(0)])
                p.grad = shard if as_dtensor else shard.to_local()
            optimizer.step()

        for number in range(3):
            step(sharded, opt, number, True)
            step(alone, ref, number, False)
        for p, q in zip(sharded, alone):
            assert torch.equal(p.to_local(), q), f"{cls.__name__}: sharded update differs from the shard's own"
        assert opt.state[sharded[0]]["state1"].dtype == torch.uint8
        assert opt.state[sharded[1]]["state1"].dtype == torch.float32

        state = opt.state_dict()["state"]
        codes, absmax = state[0]["state1"], state[0]["absmax1"]
        assert isinstance(codes, DTensor) and codes.shape == SHAPES[0] and codes.dtype == torch.uint8
        assert isinstance(absmax, DTensor) and absmax.shape == (2, n_blocks(129 * 33, 256))
        assert isinstance(state[1]["state1"], DTensor) and state[1]["state1"].shape == SHAPES[1]

        path = f"{checkpoint_dir}/{index}"
        dcp.save({"optimizer": _by_name(opt.state_dict())}, checkpoint_id=path)
        resumed_params = [torch.nn.Parameter(distribute_tensor(p.detach().full_tensor(), mesh, [Shard(0)])) for p in sharded]
        resumed = cls(resumed_params, **kwargs)
        resumed.init_states()  # the template the checkpoint is loaded into
        template = {"optimizer": _by_name(resumed.state_dict())}
        dcp.load(template, checkpoint_id=path)
        loaded = template["optimizer"]
        resumed.load_state_dict({**loaded, "state": {int(k): v for k, v in loaded["state"].items()}})
        for number in range(3, 5):
            step(sharded, opt, number, True)
            step(resumed_params, resumed, number, True)
        for p, q in zip(sharded, resumed_params):
            assert torch.equal(p.to_local(), q.to_local()), f"{cls.__name__}: resumed run differs"
    # what the parent checks: every optimizer ran to its end on this rank
    Path(checkpoint_dir, f"rank{rank}.done").write_text(str(len(OPTIMIZERS)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_states_update_save_and_resume_bitwise(tmp_path):
    checkpoint_dir = tmp_path / "dcp"
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(checkpoint_dir)), nprocs=2, join=True)
    # each rank's assertions raise through mp.spawn; these say both ranks got through all of them
    for rank in range(2):
        assert (checkpoint_dir / f"rank{rank}.done").read_text() == str(len(OPTIMIZERS))
    assert all((checkpoint_dir / str(index)).is_dir() for index in range(len(OPTIMIZERS)))
