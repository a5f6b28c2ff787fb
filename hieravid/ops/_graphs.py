"""One mechanism for CUDA-graph replay of pure tensor functions, owned by the caller (never a global).

A :class:`GraphCache` captures ``fn(*inputs)`` once per key (shapes, dtypes, parameters) and replays it for
later calls with the same key: the inputs are copied into the graph's static buffers, the graph is replayed
and its outputs are cloned (so a later replay never overwrites a result the caller kept). Results are
bit-identical to calling ``fn`` eagerly. The cache is bounded (least recently used dropped) because every
graph keeps its static buffers and a private memory pool; its owner (a
:class:`~hieravid.runtime.PruningHandle`) drops it with itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["GraphCache"]


class _Captured:
    """``fn`` captured on static copies of its inputs."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> None:
        self.inputs = tuple(tensor.clone() for tensor in inputs)
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisations, autotuning)
            fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs: tuple[Tensor, ...]) -> Any:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        self.graph.replay()
        return tree_map(lambda value: value.clone() if isinstance(value, Tensor) else value, self.outputs)


class GraphCache:
    """CUDA graphs of pure tensor functions, one per key, at most ``size`` kept (least recently used dropped).

    Args:
        size: graphs kept; each holds static copies of its inputs and outputs and a private memory pool.
    """

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph and the memory it holds."""
        self._graphs.clear()

    def run(self, key: Hashable, fn: Callable[..., Any], inputs: tuple[Tensor, ...]) -> Any:
        """``fn(*inputs)`` (CUDA tensors) through the graph captured for ``key``, capturing it on first use.

        ``key`` must determine everything ``fn`` does besides the values of ``inputs``: their shapes, dtypes and
        devices, and every parameter ``fn`` closes over.
        """
        runner = self._graphs.get(key)
        if runner is None:
            runner = _Captured(fn, inputs)
            self._graphs[key] = runner
            while len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return runner(inputs)
