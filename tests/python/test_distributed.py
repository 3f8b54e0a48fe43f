"""Distributed engines on CPU with gloo, 2 processes: DDP, FSDP2 (fully_shard) and transformers' own tensor
parallelism (DistributedConfig(tp_size=2), i.e. tp_plan="auto").

- DDP / FSDP2: a patched tiny Qwen3 trains to the same losses as the unpatched model under the same wrapper.
- TP: a patched tiny Qwen3 and Qwen3-MoE, loaded with tp_size=2, give the loss and every gradient of the unpatched
  TP model, and (transformers 5.x) of an unpatched model without TP. transformers' TP all-reduces the q_norm /
  k_norm weight gradients in a module backward hook, which a fused layer would skip: those layers run unfused.
  (transformers 4.57's TP plan has no such all-reduce, so its unpatched TP norm gradients are partial per rank;
  there the patched TP model is compared with the unpatched TP model only.)

The ops keep no global state, so nothing differs across processes. Workers write their results, meet at a
barrier and leave with os._exit: gloo's teardown has aborted a process after its work was done ("terminate called
without an active exception"), which is not what these tests are about.
"""

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
WORLD = 2


def _init(rank: int, init_file: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    # transformers' TP reads the launcher's environment (torchrun sets these)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _finish(out_dir: str, rank: int, result) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(worker, tmp_path, *args) -> list:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


# ----------------------------------------------------------------------------------------------------------------
# DDP / FSDP2


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


def _data_parallel_worker(rank: int, init_file: str, out_dir: str, wrapper: str) -> None:
    _init(rank, init_file)
    _finish(out_dir, rank, {"unpatched": _train(wrapper, False, rank), "patched": _train(wrapper, True, rank)})


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_process_training_matches(tmp_path, wrapper):
    results = _spawn(_data_parallel_worker, tmp_path, wrapper)
    for result in results:
        assert len(result["patched"]) == STEPS
        for ours, ref in zip(result["patched"], result["unpatched"]):
            assert abs(ours - ref) <= 1e-5, (wrapper, result)
    assert results[0]["patched"] == results[1]["patched"], "all-reduced losses agree across ranks"


# ----------------------------------------------------------------------------------------------------------------
# transformers' tensor parallelism


def _model_class(family: str):
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    return Qwen3ForCausalLM if family == "qwen3" else Qwen3MoeForCausalLM


def _batch():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _loss_and_grads(model) -> dict:
    """Loss and every parameter gradient, as full (unsharded) lists of floats."""
    model.zero_grad()
    ids = _batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if hasattr(grad, "full_tensor"):  # DTensor: a collective, called by both ranks in the same order
            grad = grad.full_tensor()
        grads[name] = grad.flatten().tolist()
    return {"loss": loss.item(), "grads": grads}


def _load_tp(family: str, path: str):
    cls = _model_class(family)
    if _has_distributed_config():  # 5.x
        from transformers import DistributedConfig

        return cls.from_pretrained(path, distributed_config=DistributedConfig(tp_size=WORLD), dtype=torch.float32)
    return cls.from_pretrained(path, tp_plan="auto", tp_size=WORLD, dtype=torch.float32)  # 4.57


def _has_distributed_config() -> bool:
    import transformers

    return hasattr(transformers, "DistributedConfig")


def _tensor_parallel_worker(rank: int, init_file: str, out_dir: str, family: str, path: str) -> None:
    _init(rank, init_file)
    import ropekit

    result = {}
    for patched in (False, True):
        ropekit.unpatch()
        if patched:
            ropekit.apply_to_qwen3()
        model = _load_tp(family, path).train()
        norm = model.model.layers[0].self_attn.q_norm
        result["patched" if patched else "unpatched"] = _loss_and_grads(model)
        # transformers' all-reduce of the norm gradients: a full backward hook on the norm (5.x up to 5.23), an
        # instance-level forward (5.24) or a forward pre-hook (5.25) that adds post-accumulate-grad hooks to its
        # parameters; each keeps the fusion off for the norm, so the all-reduce runs
        result["norm_backward_hooks"] = (len(norm._backward_hooks) + len(norm._forward_pre_hooks)
                                         + int("forward" in vars(norm)))
    ropekit.unpatch()
    _finish(out_dir, rank, result)


def _assert_close(ours: dict, ref: dict, what: str, atol: float) -> None:
    assert abs(ours["loss"] - ref["loss"]) <= 1e-6, (what, ours["loss"], ref["loss"])
    assert ours["grads"].keys() == ref["grads"].keys(), what
    for name, ref_grad in ref["grads"].items():
        torch.testing.assert_close(torch.tensor(ours["grads"][name]), torch.tensor(ref_grad), rtol=1e-4, atol=atol,
                                   msg=f"{what}: {name}")


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_tensor_parallel_matches(tmp_path, unpatch_after, family):
    from conftest import build, tiny_qwen3_config, tiny_qwen3_moe_config

    config = tiny_qwen3_config() if family == "qwen3" else tiny_qwen3_moe_config()
    model = build(_model_class(family), config, "cpu").train()  # random norm weights: their grads are checked
    path = str(tmp_path / "model")
    model.save_pretrained(path)
    reference = _loss_and_grads(model)  # one process, no TP, unpatched
    results = _spawn(_tensor_parallel_worker, tmp_path, family, path)
    for rank, result in enumerate(results):
        _assert_close(result["patched"], result["unpatched"], f"rank {rank}: patched TP vs unpatched TP", 1e-7)
        if result["norm_backward_hooks"]:  # transformers 5.x: TP all-reduces the q_norm/k_norm gradients
            _assert_close(result["patched"], reference, f"rank {rank}: patched TP vs no TP", 1e-7)
            _assert_close(result["unpatched"], reference, f"rank {rank}: unpatched TP vs no TP", 1e-7)
    if _has_distributed_config():
        assert results[0]["norm_backward_hooks"], "transformers 5.x installs the norm gradient all-reduce"
