"""Worker side: which request sits in each row of the batch being built.

vLLM's CommonAttentionMetadata carries no request ids, yet every row needs its own
RocketKV plan (prompt length, budget, mode). The plugin wraps the model runner's
`_build_attention_metadata` so that, while the metadata builders run, `current_rows()`
returns the runner's request states in row order.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

_rows: Sequence[Any] = ()


@contextlib.contextmanager
def rows_of_batch(rows: Sequence[Any]) -> Iterator[None]:
    global _rows
    previous, _rows = _rows, rows
    try:
        yield
    finally:
        _rows = previous


def current_rows() -> Sequence[Any]:
    """Request states (with num_prompt_tokens and sampling_params) of rows 0..num_reqs-1."""
    return _rows
