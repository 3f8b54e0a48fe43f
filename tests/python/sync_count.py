"""Counting host syncs on a CPU: the reads of device data that a GPU run would block on.

Everything runs on the CPU, where nothing syncs; the harness marks which tensors would live on the device (the
tensors and modules given: inputs, parameters, buffers, and everything computed from them) and counts each operation
that needs such a tensor's values on the host: ``.item()`` / ``int()`` / ``bool()`` and scalar conversions
(``aten._local_scalar_dense``), ``tolist`` / ``numpy`` / ``.cpu()`` / ``.to("cpu")`` (whose result is host data
from then on), and the ops whose output size depends on the values (``nonzero``, boolean indexing,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``). Tensors made on the host from Python
numbers are host data: reading them back costs nothing. ``.to(t.device)`` is taken for what it is in transformers'
code, a move towards the device (here both are the CPU). On a
GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the ground truth; this is its CPU stand-in (the benchmarks use
it where no GPU is lent, and the tests use it to bound the syncs of a vision tower's forward).
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

# ops that need the values of their (device) inputs on the host
_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique2, aten.unique_consecutive,
             aten.unique_dim, aten.equal, aten.is_nonzero, aten.bincount}
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _tensors(tree):
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class SyncCounter:
    """``with SyncCounter(*device_data) as syncs: ...`` then ``syncs.count`` and ``syncs.where`` (a Counter of
    "op at file:line" of the first frame outside torch). ``device_data``: tensors and modules (their parameters and
    buffers) that would live on the device."""

    def __init__(self, *device_data):
        self.tagged = WeakTensorKeyDictionary()
        for item in device_data:
            if isinstance(item, torch.nn.Module):
                for t in list(item.parameters()) + list(item.buffers()):
                    self.tagged[t] = True
            elif isinstance(item, torch.Tensor):
                self.tagged[item] = True
        self.count = 0
        self.where: collections.Counter = collections.Counter()

    def is_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.tagged

    def record(self, what: str) -> None:
        self.count += 1
        frame = next((f for f in reversed(traceback.extract_stack()[:-3])
                      if "/torch/" not in f.filename and "sync_count" not in f.filename), None)
        self.where[f"{what} at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else what] += 1

    def __enter__(self):
        counter = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                inputs = _tensors((args, kwargs))
                device = any(counter.is_device(t) for t in inputs)
                packet = func.overloadpacket
                if device:
                    bool_index = packet in (aten.index, aten.index_put, aten.index_put_) and any(
                        t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2]))
                    sized_by_values = packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
                        and kwargs.get("output_size") is None
                    if packet in _SYNC_OPS or bool_index or sized_by_values:
                        counter.record(str(packet))
                out = func(*args, **kwargs)
                if device:
                    for t in _tensors(out):
                        counter.tagged[t] = True
                    if func._schema.is_mutable:
                        for t in inputs:
                            counter.tagged[t] = True
                return out

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                pull = func in _HOST_READS
                if func is torch.Tensor.to:  # a literal "cpu" ("cpu:0"): code moves to a tensor's .device (a
                    # torch.device, on the CPU here) for host-to-device
                    target = kwargs.get("device", args[1] if len(args) > 1 else None)
                    pull = isinstance(target, str) and torch.device(target).type == "cpu"
                if not (pull and args and counter.is_device(args[0])):
                    return func(*args, **kwargs)
                counter.record(f"{func.__name__}(cpu)" if func is torch.Tensor.to else func.__name__)
                out = func(*args, **kwargs)
                for t in _tensors(out):  # on the host now: reading it costs nothing more
                    counter.tagged.pop(t, None)
                return out

        self._modes = [Dispatch(), Function()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
