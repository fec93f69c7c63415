"""Runs each decode kernel once on a Llama-3.1-8B-shaped batch, synchronising after each,
and the CUDA C++ write_kv once on each of its paths: a target for compute-sanitizer
(gpu_checks.sh) that names the kernel that fails.

    python benchmarks/decode_ops_once.py BATCH CONTEXT
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocketkv_vllm.kernels import cuda_ops  # noqa: E402
from rocketkv_vllm.kernels import triton_ops as T  # noqa: E402
from rocketkv_vllm.kv_layout import FEW_CHANNEL_GROUP, KVLayout  # noqa: E402

BLOCK, Q_HEADS, KV_HEADS, HEAD_DIM = 16, 32, 8, 128


def run(name: str, fn) -> None:
    fn()
    torch.cuda.synchronize()
    print("ok", name, flush=True)


def write_kv_paths() -> None:
    """16-byte and one-channel-a-thread accesses (misaligned rows), head_dim 128/72/40, each
    dtype, row-major and grouped summaries (groups of 4 or 1, narrower than a 16-byte vector: one channel a thread); a
    50-token run from mid-page (summaries widened, then restarted), then one token."""
    slots = torch.arange(3, 54, device="cuda")
    for group in (0, 8, 4, 1):
        layout = KVLayout(BLOCK, 4, group)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for d, misaligned in ((128, False), (72, False), (128, True), (40, True)):
                kv = torch.randn(layout.cache_shape(8, KV_HEADS, d), dtype=dtype, device="cuda")
                rows = torch.randn(2, len(slots), KV_HEADS, d + misaligned, dtype=dtype, device="cuda")[..., int(misaligned):]
                for part in (slice(0, 50), slice(50, 51)):
                    run(f"write_kv[cuda] group {group} {dtype} d={d}{' misaligned' if misaligned else ''} "
                        f"tokens {part.start}..{part.stop}",
                        lambda: cuda_ops.write_kv(kv, layout, rows[0, part], rows[1, part], slots[part]))


def main(batch: int, context: int) -> None:
    layout = KVLayout(BLOCK, 4)
    blocks_per_request = context // BLOCK + 1
    kv = torch.randn(layout.cache_shape(batch * blocks_per_request, KV_HEADS, HEAD_DIM), dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(batch * blocks_per_request, device="cuda").int().view(batch, blocks_per_request)
    seq = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    keep, gap = torch.full_like(seq, context * 3 // 10), seq - 64
    query = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    channels, pages = torch.full_like(seq, 108), torch.full_like(seq, 256)

    pos = seq.long()
    slots = table.gather(1, (pos // BLOCK)[:, None].int()).long()[:, 0] * BLOCK + pos % BLOCK
    new = torch.randn(batch, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    run("write_kv[triton]", lambda: T.write_kv(kv, layout, new, new, slots))
    if cuda_ops.available():
        run("write_kv[cuda]", lambda: cuda_ops.write_kv(kv, layout, new, new, slots))
        write_kv_paths()
    # (mode, summary group, chosen channels): mt also on its server's layout, once per gather tier
    cases = [("rocketkv", 0, 108), ("mt", 0, 108)]
    cases += [(f"mt, grouped summaries, {r} channels", FEW_CHANNEL_GROUP, r) for r in (8, 16, 32)]
    for mode, group, r in cases:
        if mode != "rocketkv":
            keep.fill_(context)
        layout = KVLayout(BLOCK, 4, group)
        channels.fill_(r)
        selection = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, channels, pages)
        run(f"hsa_select_pages[{mode}]", lambda: None)
        run(f"paged_sparse_attention[{mode}]", lambda: T.paged_sparse_attention(
            query, kv, layout, table, selection.index, selection.count, seq, keep, gap, HEAD_DIM**-0.5))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
