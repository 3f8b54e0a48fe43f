"""DDP and FSDP2 (fully_shard) on CPU with gloo, 2 processes: a patched tiny Qwen3 trains to the same losses as the
unpatched model under the same wrapper. The ops keep no global state, so nothing differs across processes."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.transformers

STEPS = 3


def _train(wrapper: str, patched: bool, rank: int) -> list[float]:
    import ropekit
    from transformers import Qwen3ForCausalLM

    from conftest import tiny_qwen3_config

    ropekit.unpatch()
    if patched:
        ropekit.apply_to_qwen3()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config()).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append(reduced.item() / dist.get_world_size())
    ropekit.unpatch()
    return losses


def _worker(rank: int, world: int, init_file: str, out_dir: str, wrapper: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {"unpatched": _train(wrapper, False, rank), "patched": _train(wrapper, True, rank)}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_process_training_matches(tmp_path, wrapper):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), wrapper), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for result in results:
        assert len(result["patched"]) == STEPS
        for ours, ref in zip(result["patched"], result["unpatched"]):
            assert abs(ours - ref) <= 1e-5, (wrapper, result)
    assert results[0]["patched"] == results[1]["patched"], "all-reduced losses agree across ranks"
