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

import logging
import weakref
from typing import Callable, Hashable

import torch

from rocketkv_vllm.kernels.triton_common import cuda_index

logger = logging.getLogger("vllm.rocketkv")  # vLLM's handler and format


class SharedPool:
    """One graph memory pool for every layer's graphs: a graph's scratch is dead once it has
    run, and replays never overlap (one stream), so they can share it.

    The allocators (device and pinned host) retire a pool once every graph captured into it
    is gone and then refuse captures into it (`use_count > 0` assertions), so a pool lives
    exactly as long as the LayerGraphs holding it: when an engine is torn down with its
    layers, the next engine of the process gets a new pool."""

    _current: dict[int, "weakref.ref[SharedPool]"] = {}

    def __init__(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()
        self.retired = False

    @classmethod
    def of(cls, device: torch.device) -> "SharedPool":
        index = cuda_index(device)
        ref = cls._current.get(index)
        pool = ref() if ref is not None else None
        if pool is None:
            with torch.cuda.device(index):
                pool = cls()
            cls._current[index] = weakref.ref(pool)
        return pool

    def retire(self, device: torch.device) -> None:
        """After a failed capture, whose half-begun recording may linger in the pool: later
        captures (of any layer) go to a new one."""
        self.retired = True
        ref = self._current.get(cuda_index(device))
        if ref is not None and ref() is self:
            del self._current[cuda_index(device)]


_capture_streams: dict[int, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture: the caching allocator reuses a freed
    block only on the stream that freed it, so captures on many streams would not share
    their scratch within the pool."""
    index = cuda_index(device)
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(index)
    return _capture_streams[index]


def padded_rows(rows: int, max_rows: int) -> int:
    """The row count a graph is captured for: the next power of two, at most max_rows (so a
    layer holds about log2(max_rows) graphs)."""
    return min(max_rows, 1 << max(0, rows - 1).bit_length())


def capture(body: Callable[[], None], device: torch.device, pool: tuple) -> torch.cuda.CUDAGraph:
    """body() run once (compiles its kernels outside the capture), then captured into `pool`."""
    current = torch.cuda.current_stream(device)
    side = _capture_stream(device)
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            body()
            try:
                # thread_local: vLLM's other threads may allocate while this one captures
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            except RuntimeError:
                if torch.cuda.is_current_stream_capturing():  # (it failed past cudaStreamBeginCapture)
                    try:
                        graph.capture_end()
                    except RuntimeError:
                        pass
                _leave_capture_mode(device)
                raise
            try:
                body()
            finally:
                try:
                    graph.capture_end()
                except RuntimeError:
                    _leave_capture_mode(device)
                    raise
    finally:
        # (also before a fallback's direct run: the warm-up run on the side stream writes the
        # same scratch)
        current.wait_stream(side)
    return graph


def _leave_capture_mode(device: torch.device) -> None:
    """capture_begin puts the default CUDA generator in capture mode and only a successful
    capture_end takes it out (a capture_begin that fails past that point or an invalidated
    capture never do), after which every random op on the device
    raises "Offset increment outside graph capture": give it a fresh state with the same
    seed and offset."""
    generator = torch.cuda.default_generators[cuda_index(device)]
    generator.graphsafe_set_state(generator.clone_state())


class LayerGraphs:
    """One attention layer's captured decode graphs, by the key of their inputs."""

    def __init__(self) -> None:
        # None: the capture failed, and that key's steps launch body() directly
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph | None] = {}
        self._pool: SharedPool | None = None

    def __len__(self) -> int:
        """Graphs captured."""
        return sum(graph is not None for graph in self._graphs.values())

    def replay(self, key: Hashable, body: Callable[[], None], device: torch.device) -> None:
        """Replay the graph of `key`, capturing body() first if there is none (the key must
        name every address and launch decision body() depends on)."""
        if key not in self._graphs:
            if self._pool is None or self._pool.retired:
                self._pool = SharedPool.of(device)
            try:
                self._graphs[key] = capture(body, device, self._pool.handle)
            except RuntimeError as error:
                self._pool.retire(device)
                # a serving engine keeps going on direct launches (a real error in body()
                # raises again from the direct call below)
                logger.warning("RocketKV could not capture a decode-attention graph for %s, launching it "
                               "directly instead: %s", key, error)
                self._graphs[key] = None
        graph = self._graphs[key]
        if graph is None:
            body()
        else:
            graph.replay()
