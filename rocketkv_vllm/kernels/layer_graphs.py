"""Per-layer CUDA graphs of the decode attention, for steps that vLLM runs without a full graph.

vLLM replays a whole pure-decode step as one CUDA graph. Every other step (a prefill chunk
beside decodes, a batch size it did not capture, --enforce-eager) calls each layer's attention
from Python, and launching the page selection and the split attention from Python (five
kernels, Triton launches costing tens of microseconds of host time each) made such a step
host-bound: 15.3 ms against the full graph's 2.0 ms at 130K x 3 over 32 layers
(benchmarks/results/eager_host_h200.json). So each layer captures its decode part once per
padded row count, over fixed-address inputs (the metadata builder's padded columns, block-table
copy and query/output buffers), and a step copies its decode queries in, replays, and copies
the output out.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

_pools: dict[int, tuple] = {}


def _pool(device: torch.device) -> tuple:
    """One memory pool for every layer's graphs: a graph's scratch is dead once it has run, and
    replays never overlap (one stream), so they can share it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _pools:
        _pools[index] = torch.cuda.graph_pool_handle()
    return _pools[index]


def padded_rows(rows: int, max_rows: int) -> int:
    """The row count a graph is captured for: the next power of two, at most max_rows (so a
    layer holds about log2(max_rows) graphs)."""
    return min(max_rows, 1 << max(0, rows - 1).bit_length())


def capture(body: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """body() run once (compiles its kernels outside the capture), then captured."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        body()
        # thread_local: vLLM's other threads may allocate while this one captures
        graph.capture_begin(pool=_pool(device), capture_error_mode="thread_local")
        try:
            body()
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return graph


class LayerGraphs:
    """One attention layer's captured decode graphs, by the key of their inputs."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def replay(self, key: Hashable, body: Callable[[], None], device: torch.device) -> None:
        """Replay the graph of `key`, capturing body() first if there is none (the key must
        name every address and launch decision body() depends on)."""
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = capture(body, device)
        graph.replay()
