"""Worker side: which request sits in each row of the batch being built.

vLLM's CommonAttentionMetadata carries no request ids, yet every row needs its own
RocketKV plan (prompt length, budget, mode). The plugin wraps the model runner's
`_build_attention_metadata` so that, while the metadata builders run, `current_batch()`
holds the runner's request states in row order, and its `_dummy_run` so that profiling,
warm-up and graph-capture batches are marked as such. Outside both, `current_batch()` is
None: a build there cannot know which rows evict, and must not guess.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence


@dataclass(frozen=True)
class BatchRows:
    """states: request states (req_id, num_prompt_tokens, sampling_params) of rows
    0..len-1, None where the runner holds no state for a row; dummy: a batch without
    requests (profiling, warm-up, CUDA-graph capture), whose rows attend exactly."""

    states: Sequence[Any] = ()
    dummy: bool = False


DUMMY_BATCH = BatchRows(dummy=True)
_current: BatchRows | None = None


@contextlib.contextmanager
def publishing(batch: BatchRows) -> Iterator[None]:
    global _current
    previous, _current = _current, batch
    try:
        yield
    finally:
        _current = previous


def rows_of_batch(states: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
    """The request states of a real batch, in row order."""
    return publishing(BatchRows(states))


def dummy_batch() -> contextlib.AbstractContextManager[None]:
    return publishing(DUMMY_BATCH)


def current_batch() -> BatchRows | None:
    """The batch being built, or None outside the model runner's hooks."""
    return _current
