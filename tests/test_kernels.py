"""Triton / CUDA C++ kernels against the torch reference ops (rocketkv_vllm.ops.reference).

On a CPU-only machine the Triton kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py before anything imports triton) with small shapes; on a
GPU the same tests run natively with bigger shapes, plus the GPU-only tests (CUDA-graph
capture, CUDA C++ write_kv and top-k; on the GPU every selection test runs the CUDA top-k).
"""

import pytest
import torch
import triton
import triton.language as tl

CUDA = torch.cuda.is_available()

from rocketkv_vllm.algorithms.hsa import (  # noqa: E402
    _group_queries,
    _group_softmax_mean,
    _sparq_temperature,
    approximate_page_scores,
    top_channel_mask,
)
from rocketkv_vllm.algorithms.snapkv import window_scores  # noqa: E402
from rocketkv_vllm.kernels import triton_ops as T  # noqa: E402
from rocketkv_vllm.kernels.triton_hsa import _digit_hist, _radix_refine  # noqa: E402
from rocketkv_vllm.kv_layout import FEW_CHANNEL_GROUP, KVLayout  # noqa: E402
from rocketkv_vllm.ops import reference as R  # noqa: E402
from rocketkv_vllm.ops.newest_page import NewestPages  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
# context lengths of the ragged batches: small under the interpreter, bigger on a GPU
SCALE = 8 if CUDA else 1
HEAD_DIMS = [64, 128] if CUDA else [32]
POISON = 1000.0  # finite stand-in in dead value slots (the reference multiplies them by 0)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-2


def same_cache(a, b):
    """Bitwise-equal caches, NaN (unwritten) positions included."""
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def build_cache(layout, hkv, d, lengths, dtype, extra_blocks=1, chunk=7, seed_blocks=2):
    """Random tokens of ragged requests written (reference write_kv) into a NaN-poisoned cache."""
    bs = layout.block_size
    per_req = [-(-n // bs) + extra_blocks for n in lengths]
    num_blocks = sum(per_req) + seed_blocks
    kv = torch.full(layout.cache_shape(num_blocks, hkv, d), float("nan"), dtype=dtype, device=DEV)
    perm = torch.randperm(num_blocks)
    table = torch.zeros(len(lengths), max(per_req), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(per_req):
        table[i, :nb] = perm[used : used + nb].int()
        used += nb
    table = table.to(DEV)
    keys, values = [], []
    for i, n in enumerate(lengths):
        k = torch.randn(n, hkv, d, device=DEV).to(dtype)
        v = torch.randn(n, hkv, d, device=DEV).to(dtype)
        pos = torch.arange(n, device=DEV)
        slots = table[i, pos // bs].long() * bs + pos % bs
        for c in torch.arange(n, device=DEV).split(chunk):
            R.write_kv(kv, layout, k[c], v[c], slots[c])
        keys.append(k)
        values.append(v)
    return kv, table, keys, values


def ragged_batch(layout, lengths):
    """seq_lens, keep, gap_end: request 0 evicted nothing, 1 and 3 have an evicted gap,
    the last request evicted everything (empty selection)."""
    seq = torch.tensor(lengths)
    keep, gap = seq.clone(), seq.clone()
    if len(lengths) > 1:
        keep[1], gap[1] = lengths[1] // 3, lengths[1] // 2 + 1
    if len(lengths) > 3:
        keep[3], gap[3] = lengths[3] // 4 + 1, lengths[3] - 5
    keep[-1], gap[-1] = 0, lengths[-1]
    return seq.to(DEV), keep.to(DEV), gap.to(DEV)


def poison_dead_tokens(kv, layout, table, seq, keep, gap):
    """Dead keys (evicted gap, past seq_len) -> NaN, dead values -> POISON (finite, see POISON)."""
    bs = layout.block_size
    keys, values = layout.keys(kv), layout.values(kv)
    for i in range(table.shape[0]):
        n_slots = table.shape[1] * bs
        pos = torch.arange(n_slots, device=DEV)
        dead = (pos >= seq[i]) | ((pos >= keep[i]) & (pos < gap[i]))
        pos = pos[dead]
        blk, off = table[i, pos // bs].long(), pos % bs
        keys[blk, :, off] = float("nan")
        values[blk, :, off] = POISON
    values.nan_to_num_(POISON)


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """torch.empty returns NaN (floats) or -777 (integers) instead of whatever memory it gets
    (often the oracle's freed tensor of the same shape): a kernel that leaves part of its
    scratch unwritten, then reads it, fails."""
    empty = torch.empty

    def poisoned(*size, **kwargs):
        t = empty(*size, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -777)

    monkeypatch.setattr(torch, "empty", poisoned)


def oracle_scores(query, kv, layout, table, seq, keep, gap, top_channels):
    num_pages = -(-int(seq.max()) // layout.page_size)
    hkv = kv.shape[1]
    kmax, kmin = R.gather_page_summaries(kv, layout, table, num_pages)
    plen = R.page_lengths(seq, keep, gap, num_pages, layout.page_size)
    channels = top_channel_mask(query, hkv, top_channels)
    q = _group_queries(query, hkv)
    bound = approximate_page_scores(query, kmax, kmin, channels)
    logits = bound / _sparq_temperature(q, channels)[..., None]
    logits = logits + plen.clamp(min=1).float().log()[:, None, None, :]
    valid = plen > 0
    return _group_softmax_mean(logits, valid), valid


def chosen_pages(selection, b, h):
    """The pages a PageSelection chose for request b, KV head h (entries past count are unspecified)."""
    return selection.index[b, h, : int(selection.count[b, h])].long()


def assert_same_selection(out, ref, scores):
    """Identical page sets, or sets whose scores are equal (ties); ascending order."""
    assert out.count.shape == ref.count.shape, (out.count.shape, ref.count.shape)
    assert torch.equal(out.count.cpu(), ref.count.cpu()), (out.count, ref.count)
    for b in range(out.count.shape[0]):
        for h in range(out.count.shape[1]):
            a, r = chosen_pages(out, b, h), chosen_pages(ref, b, h)
            assert (a >= 0).all() and torch.equal(a, a.sort().values), (b, h, a)
            if torch.equal(a, r):
                continue
            sa, sr = scores[b, h, a].sort().values, scores[b, h, r].sort().values
            torch.testing.assert_close(sa, sr, rtol=1e-4, atol=1e-6 * float(scores[b, h].max()))


# ---------------------------------------------------------------------------------------
# write_kv
# ---------------------------------------------------------------------------------------

WRITE_CASES = [(16, 1), (16, 2), (16, 4), (16, 16), (32, 4), (32, 8), (32, 32)]


@pytest.mark.parametrize("block_size,page_size", WRITE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv(block_size, page_size, dtype):
    torch.manual_seed(block_size * 100 + page_size)
    layout = KVLayout(block_size, page_size)
    hkv, d = 2, HEAD_DIMS[-1]
    lengths = [n * SCALE for n in (37, 19, 45)]
    _, table, keys, values = build_cache(layout, hkv, d, lengths, dtype)
    num_blocks = int(table.max()) + 3
    kv_ref = torch.full(layout.cache_shape(num_blocks, hkv, d), float("nan"), dtype=dtype, device=DEV)
    # stale summaries of a reused block: a page's first write must restart them, not widen them
    layout.page_max(kv_ref).fill_(100.0)
    layout.page_min(kv_ref).fill_(-100.0)
    kv_tri = kv_ref.clone()
    bs = block_size
    # prefill in chunks of different sizes (many tokens per page), then batched decode steps
    prompt = [n - 5 for n in lengths]
    for i, n in enumerate(prompt):
        pos = torch.arange(n, device=DEV)
        slots = table[i, pos // bs].long() * bs + pos % bs
        for c in pos.split(13 if i else n):
            for kv, fn in ((kv_ref, R.write_kv), (kv_tri, T.write_kv)):
                fn(kv, layout, keys[i][c], values[i][c], slots[c])
    for step in range(5):
        pos = torch.tensor([p + step for p in prompt], device=DEV)
        b = torch.arange(len(lengths), device=DEV)
        slots = table[b, pos // bs].long() * bs + pos % bs
        slots = torch.cat([slots, torch.tensor([-1, -1], device=DEV)])  # CUDA-graph padding
        k = torch.stack([keys[i][prompt[i] + step] for i in range(len(lengths))])
        v = torch.stack([values[i][prompt[i] + step] for i in range(len(lengths))])
        k = torch.cat([k, torch.full_like(k[:2], float("nan"))])
        v = torch.cat([v, torch.full_like(v[:2], float("nan"))])
        for kv, fn in ((kv_ref, R.write_kv), (kv_tri, T.write_kv)):
            fn(kv, layout, k, v, slots)
    assert same_cache(kv_tri, kv_ref)


@pytest.mark.parametrize("summary_group", [1, 2, 4, FEW_CHANNEL_GROUP])
def test_kernels_follow_the_summary_group(summary_group, poisoned_scratch):
    """The summary writes (write_kv, compaction) match the reference's, and page scoring
    reads them back, for summary channel groups (the other tests mostly use rows)."""
    torch.manual_seed(summary_group)
    layout, hkv, d = KVLayout(16, 4, summary_group), 2, HEAD_DIMS[-1]
    lengths = [n * SCALE for n in (70, 45)]
    kv, table, keys, values = build_cache(layout, hkv, d, lengths, torch.float32)
    kv_tri = torch.full_like(kv, float("nan"))
    for i, n in enumerate(lengths):
        pos = torch.arange(n, device=DEV)
        slots = table[i, pos // layout.block_size].long() * layout.block_size + pos % layout.block_size
        for c in pos.split(7):
            T.write_kv(kv_tri, layout, keys[i][c], values[i][c], slots[c])
    assert same_cache(kv_tri, kv)
    kept = torch.stack([torch.randperm(lengths[0], device=DEV)[: 29 * SCALE].sort().values for _ in range(hkv)])
    R.compact_kept_tokens(kv, layout, table[0], kept, lengths[0])
    T.compact_kept_tokens(kv_tri, layout, table[0], kept, lengths[0])
    assert same_cache(kv_tri, kv)
    seq = torch.tensor(lengths, device=DEV)
    keep = torch.tensor([29 * SCALE, lengths[1]], device=DEV)
    query = torch.randn(2, hkv * 4, d, device=DEV)
    for r in (d, 2):
        top_channels = torch.tensor([r, r], device=DEV)
        scores, valid = oracle_scores(query, kv, layout, table, seq, keep, seq, top_channels)
        got = T.hsa_page_scores(query, kv, layout, table, seq, keep, seq, top_channels)[..., : scores.shape[-1]]
        torch.testing.assert_close(got.masked_fill(~valid[:, None], 0), scores.masked_fill(~valid[:, None], 0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("page_size", [1, 4])
def test_write_kv_mixed_batch_and_unsorted(page_size):
    """Several requests in one call, fp32 keys into a bf16 cache, and pages_contiguous=False."""
    torch.manual_seed(7 + page_size)
    layout = KVLayout(16, page_size)
    hkv, d = 3, HEAD_DIMS[0]
    num_blocks = 12
    kv_ref = torch.full(layout.cache_shape(num_blocks, hkv, d), float("nan"), dtype=torch.bfloat16, device=DEV)
    kv_tri, kv_uns = kv_ref.clone(), kv_ref.clone()
    slots = torch.cat([torch.arange(16, 40), torch.tensor([-1]), torch.arange(64, 75), torch.arange(100, 103)]).to(DEV)
    key = torch.randn(slots.numel(), hkv, d, device=DEV)
    value = torch.randn(slots.numel(), hkv, d, device=DEV)
    R.write_kv(kv_ref, layout, key, value, slots)
    T.write_kv(kv_tri, layout, key, value, slots)
    perm = torch.randperm(slots.numel(), device=DEV)
    T.write_kv(kv_uns, layout, key[perm], value[perm], slots[perm], pages_contiguous=False)
    assert same_cache(kv_tri, kv_ref)
    assert same_cache(kv_uns, kv_ref)


# ---------------------------------------------------------------------------------------
# HSA page selection
# ---------------------------------------------------------------------------------------

SELECT_CASES = [
    # group, block_size, page_size, dtype, summary_group (0: row-major)
    (1, 16, 1, torch.float32, 8),
    (4, 16, 4, torch.bfloat16, 0),
    (4, 16, 4, torch.bfloat16, 8),
    (8, 32, 8, torch.float32, 4),
    (7, 16, 2, torch.bfloat16, 0),
    (4, 32, 32, torch.float16, 8),
    (9, 16, 16, torch.float32, 0),
]


def _select_inputs(group, block_size, page_size, dtype, d, seed, summary_group=0):
    torch.manual_seed(seed)
    layout = KVLayout(block_size, page_size, summary_group)
    hkv = 2
    lengths = [n * SCALE for n in (60, 33, 90, 77, 25)]
    kv, table, _, _ = build_cache(layout, hkv, d, lengths, dtype)
    seq, keep, gap = ragged_batch(layout, lengths)
    query = torch.randn(len(lengths), hkv * group, d, device=DEV).to(dtype)
    top_channels = torch.tensor([d // 4, d, d // 8, 3, d // 2], device=DEV)
    max_pages = -(-max(lengths) // page_size)
    top_pages = torch.tensor([4, 10 * max_pages, 6, max(1, max_pages // 3), 5], device=DEV)  # 1: budget > context
    return layout, kv, table, seq, keep, gap, query, top_channels, top_pages


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("group,block_size,page_size,dtype,summary_group", SELECT_CASES)
def test_hsa_select_pages(group, block_size, page_size, dtype, summary_group, d, poisoned_scratch):
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(group, block_size, page_size, dtype, d,
                                                                      group * 31 + page_size, summary_group)
    ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
    scores, valid = oracle_scores(query, kv, layout, table, seq, keep, gap, tc)

    got = T.hsa_page_scores(query, kv, layout, table, seq, keep, gap, tc)
    n = scores.shape[-1]
    assert torch.equal(got[..., :n] > float("-inf"), valid[:, None, :].expand_as(scores))
    assert (got[..., n:] == float("-inf")).all()
    torch.testing.assert_close(got[..., :n].masked_fill(~valid[:, None], 0), scores.masked_fill(~valid[:, None], 0), rtol=1e-4, atol=1e-7)

    out = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
    assert out.index.shape == (len(seq), kv.shape[1], table.shape[1] * layout.pages_per_block)
    assert_same_selection(out, ref, scores)
    assert (out.count[-1] == 0).all()  # everything evicted: empty selection
    assert (out.count[1] == valid[1].sum()).all()  # budget > context: every live page
    # fewer programs than tiles: each program strides over several tiles of its request
    strided = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp, splits=1)
    assert_same_selection(strided, ref, scores)


@pytest.mark.parametrize("chunk", [None, 16])
def test_hsa_select_appends_the_newest_page(monkeypatch, chunk, poisoned_scratch):
    """The top-k writes each listed row's newest page after its chosen ones (no launch of its
    own), as the reference does: rows of one chunk and of many (16-page chunks: merged
    candidates), a row whose budget covers its context, one whose context is all evicted, an
    EVERY_PAGE row (no list) and a row without a newest page (-1: CUDA-graph padding)."""
    from rocketkv_vllm.kernels import triton_hsa

    if chunk:
        monkeypatch.setattr(triton_hsa, "PAGE_CHUNK", chunk)
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(4, 16, 1, torch.float32, HEAD_DIMS[0], 5)
    tp[2] = R.EVERY_PAGE
    newest = NewestPages.of(seq, layout.page_size)
    page = newest.page.clone()
    page[3] = -1
    args = (query, kv, layout, table, newest.scored_seq_lens, keep, gap, tc, tp)
    ref = R.hsa_select_pages(*args, newest_page=page)
    got = T.hsa_select_pages(*args, newest_page=page)
    plain = R.hsa_select_pages(*args)
    scores, _ = oracle_scores(query, kv, layout, table, newest.scored_seq_lens, keep, gap, tc)
    assert_same_selection(got, ref, torch.nn.functional.pad(scores, (0, 2), value=0.0))
    appended = (page >= 0) & (tp != R.EVERY_PAGE)
    assert torch.equal(ref.count.cpu(), (plain.count + appended[:, None].int()).cpu())
    for b in appended.nonzero()[:, 0].tolist():
        assert (got.index[b, torch.arange(kv.shape[1]), got.count[b] - 1] == page[b]).all()


def test_hsa_select_in_row_groups(monkeypatch):
    """A scratch budget smaller than the batch's logits: requests are scored two at a time."""
    from rocketkv_vllm.kernels import triton_hsa

    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(4, 16, 4, torch.bfloat16, HEAD_DIMS[0], 13)
    per_row = kv.shape[1] * table.shape[1] * layout.pages_per_block * (4 + 3)  # logits, keys, candidates: a lower bound
    monkeypatch.setattr(triton_hsa, "SCRATCH_ELEMENTS", 2 * per_row)
    ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
    scores, _ = oracle_scores(query, kv, layout, table, seq, keep, gap, tc)
    assert_same_selection(T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp), ref, scores)


@pytest.mark.parametrize("setting,value,seed", [("PAGE_CHUNK", 16, 9), ("LOGIT_TILE", 1, 21)])
def test_hsa_select_in_small_pieces(monkeypatch, setting, value, seed, poisoned_scratch):
    """Requests longer than the top-k kernel's chunks (every pass loops; the softmax
    statistics carry across chunks), and blocks of more pages than a logits tile (16 pages a
    block; tiles of 1 page, 8 on the few-channel path: a unit is part of a block, its max
    and min runs apart)."""
    from rocketkv_vllm.kernels import triton_hsa

    monkeypatch.setattr(triton_hsa, setting, value)
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(4, 16, 1, torch.float32, HEAD_DIMS[0], seed)
    ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
    scores, valid = oracle_scores(query, kv, layout, table, seq, keep, gap, tc)
    got = T.hsa_page_scores(query, kv, layout, table, seq, keep, gap, tc)[..., : scores.shape[-1]]
    torch.testing.assert_close(got.masked_fill(~valid[:, None], 0), scores.masked_fill(~valid[:, None], 0), rtol=1e-4, atol=1e-7)
    assert_same_selection(T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp), ref, scores)


@pytest.mark.parametrize("block_size,page_size,summary_group", [(16, 4, 0), (16, 1, FEW_CHANNEL_GROUP)])
def test_hsa_select_with_a_gap_inside_one_block(block_size, page_size, summary_group, poisoned_scratch):
    """Kept pages and tail pages sharing one block (its unit of pages is scored once for
    each part), on the whole-row and the few-channel paths."""
    from rocketkv_vllm.kernels.triton_hsa import gather_channels

    torch.manual_seed(5)
    layout, hkv, d = KVLayout(block_size, page_size, summary_group), 2, HEAD_DIMS[0]
    lengths = [200 * SCALE, 120 * SCALE]
    kv, table, _, _ = build_cache(layout, hkv, d, lengths, torch.float32)
    seq = torch.tensor(lengths, device=DEV)
    # keep 37 and gap_end 45 lie in block 2 (tokens 32-47); request 1 evicted nothing
    keep = torch.tensor([37, lengths[1]], device=DEV)
    gap = torch.tensor([45, lengths[1]], device=DEV)
    query = torch.randn(2, hkv * 4, d, device=DEV)
    for r in (d, gather_channels(d), gather_channels(d, grouped=True)):
        top_channels = torch.tensor([r, r], device=DEV)
        scores, valid = oracle_scores(query, kv, layout, table, seq, keep, gap, top_channels)
        got = T.hsa_page_scores(query, kv, layout, table, seq, keep, gap, top_channels)[..., : scores.shape[-1]]
        assert torch.equal(got > float("-inf"), valid[:, None, :].expand_as(got))
        torch.testing.assert_close(got.masked_fill(~valid[:, None], 0), scores.masked_fill(~valid[:, None], 0), rtol=1e-4, atol=1e-7)
        ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, top_channels, 7)
        assert_same_selection(T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, top_channels, 7), ref, scores)


@pytest.mark.parametrize("budgets", [[20, 900, 6, 30, 5], [2, 3, 1, 3, 2]])
@pytest.mark.parametrize("tied", [False, True])
def test_hsa_select_long_requests_large_k_and_ties(monkeypatch, tied, budgets, poisoned_scratch):
    """Requests longer than a chunk: their chunks' candidates merged in memory (k above a
    chunk, request 0: k = 20 > 16, or more candidates than a chunk) or in registers (small
    k), also with every score tied (zero queries: the lowest pages win the ties)."""
    from rocketkv_vllm.kernels import triton_hsa

    monkeypatch.setattr(triton_hsa, "PAGE_CHUNK", 16)
    layout, kv, table, seq, keep, gap, query, tc, _ = _select_inputs(4, 16, 1, torch.float32, HEAD_DIMS[0], 9)
    if tied:
        query.zero_()
    tp = torch.tensor(budgets, device=DEV)
    ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
    scores, _ = oracle_scores(query, kv, layout, table, seq, keep, gap, tc)
    assert_same_selection(T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp), ref, scores)


@pytest.mark.parametrize("k", [2, 100])
def test_hsa_select_stays_inside_the_block_table(k):
    """A request longer than its block table (not one vLLM builds) is cut at the table:
    2 blocks of 4 pages, 50 tokens kept up to 10 and from 30 on. Only pages 0-2 and 7 are
    both live and addressed; none past the table is read or chosen."""
    layout = KVLayout(16, 4)
    kv, table, _, _ = build_cache(layout, 2, HEAD_DIMS[0], [32], torch.float32)
    seq, keep, gap = (torch.tensor([x], device=DEV) for x in (50, 10, 30))
    query = torch.randn(1, 4, HEAD_DIMS[0], device=DEV)
    out = T.hsa_select_pages(query, kv, layout, table[:, :2], seq, keep, gap, HEAD_DIMS[0], k)
    for h in range(2):
        pages = chosen_pages(out, 0, h).tolist()
        assert len(pages) == min(k, 4) and set(pages) <= {0, 1, 2, 7}, pages


def test_hsa_select_survives_overflowing_logits():
    """Queries so large that page bounds overflow (inf - inf = NaN): every head still gets
    exactly min(k, live pages) distinct live pages."""
    layout, kv, table, seq, keep, gap, query, _, _ = _select_inputs(4, 16, 1, torch.float32, HEAD_DIMS[0], 5)
    query[0, 0] = 3e38
    query[1, 4:] = -3e38
    k = 10
    out = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, HEAD_DIMS[0], k)
    live = R.page_lengths(seq, keep, gap, table.shape[1] * layout.pages_per_block, layout.page_size) > 0
    for b in range(len(seq)):
        for h in range(kv.shape[1]):
            pages = chosen_pages(out, b, h)
            assert len(pages) == min(k, int(live[b].sum())), (b, h, pages)
            assert live[b, pages].all() and torch.equal(pages, pages.unique())


@pytest.mark.parametrize("head_dim", [32, 24])
def test_hsa_gathered_channels_score_like_whole_rows(head_dim, poisoned_scratch):
    """Few chosen channels (r <= gather_channels: the logits kernel reads only those) give the
    oracle's page scores, at r = 1 and r = either gather limit (the wider one over grouped
    summaries), also when head_dim is not a power of two; NaN query channels rank first and
    read nothing out of bounds."""
    from rocketkv_vllm.kernels.triton_hsa import gather_channels

    layout, kv, table, seq, keep, gap, _, _, _ = _select_inputs(4, 16, 4, torch.float32, head_dim, 17, FEW_CHANNEL_GROUP)
    query = torch.randn(len(seq), kv.shape[1] * 4, head_dim, device=DEV)
    limit, wide = gather_channels(head_dim), gather_channels(head_dim, grouped=True)
    top_channels = torch.tensor([1, limit, wide, 1, wide], device=DEV)
    scores, valid = oracle_scores(query, kv, layout, table, seq, keep, gap, top_channels)
    got = T.hsa_page_scores(query, kv, layout, table, seq, keep, gap, top_channels)[..., : scores.shape[-1]]
    torch.testing.assert_close(got.masked_fill(~valid[:, None], 0), scores.masked_fill(~valid[:, None], 0), rtol=1e-4, atol=1e-7)
    query[0, :4] = float("nan")  # a whole query group
    query[2, :4, 1] = float("nan")  # one channel of a group
    out = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, top_channels, 3)
    live = R.page_lengths(seq, keep, gap, table.shape[1] * layout.pages_per_block, layout.page_size) > 0
    for b in range(len(seq)):
        for h in range(kv.shape[1]):
            pages = chosen_pages(out, b, h)
            assert len(pages) == min(3, int(live[b].sum())) and live[b, pages].all()


@pytest.mark.parametrize("head_dim", [24, 32, 64, 128, 256])
@pytest.mark.parametrize("grouped", [False, True])
def test_gather_tiers_widen_in_channels_and_narrow_in_pages(head_dim, grouped):
    """Three few-channel paths: channel limits that never decrease (powers of two from 1,
    up to gather_channels), tiles of whole LOGIT_TILEs that never grow."""
    from rocketkv_vllm.kernels.triton_hsa import LOGIT_TILE, gather_channels, gather_tiers

    tiers = gather_tiers(head_dim, grouped)
    channels, pages = [t[0] for t in tiers], [t[1] for t in tiers]
    assert len(tiers) == 3 and channels == sorted(channels) and pages == sorted(pages, reverse=True)
    assert all(c >= 1 and c & (c - 1) == 0 for c in channels) and channels[-1] == gather_channels(head_dim, grouped)
    assert all(p % LOGIT_TILE == 0 for p in pages) and channels[-1] <= head_dim // 2


def test_hsa_gathered_channels_over_many_tiles(poisoned_scratch):
    """Few chosen channels over requests of several gather tiles (each BLOCK_D / R_GATHER
    times a whole-row tile), one program striding over all of them and the default spread,
    choose the oracle's pages; with an evicted gap and an empty request."""
    from rocketkv_vllm.kernels.triton_hsa import gather_channels

    torch.manual_seed(11)
    layout, hkv, d = KVLayout(16, 4, FEW_CHANNEL_GROUP), 2, HEAD_DIMS[0]
    lengths = [n * SCALE for n in (3000, 1300, 2100)]
    kv, table, _, _ = build_cache(layout, hkv, d, lengths, torch.float32)
    seq, keep, gap = ragged_batch(layout, lengths)
    query = torch.randn(len(lengths), hkv * 4, d, device=DEV)
    top_channels = torch.tensor([1, gather_channels(d), gather_channels(d, grouped=True)], device=DEV)
    ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, top_channels, 40)
    scores, _ = oracle_scores(query, kv, layout, table, seq, keep, gap, top_channels)
    for splits in (1, None):
        out = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, top_channels, 40, splits=splits)
        assert_same_selection(out, ref, scores)


@pytest.mark.parametrize("top_pages", [1, 3, 1 << 30])
def test_hsa_select_int_budgets(top_pages):
    layout, kv, table, seq, keep, gap, query, _, _ = _select_inputs(4, 16, 4, torch.float32, HEAD_DIMS[0], 5)
    d = query.shape[-1]
    ref = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, d // 2, top_pages)
    scores, _ = oracle_scores(query, kv, layout, table, seq, keep, gap, d // 2)
    out = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, d // 2, top_pages)
    assert_same_selection(out, ref, scores)


def test_hsa_select_ties_take_lowest_pages():
    """Equal scores at the k-th place: the lowest pages win, exactly k are chosen."""
    layout = KVLayout(16, 4)
    hkv, d, n = 2, HEAD_DIMS[0], 40 * SCALE
    kv = torch.zeros(layout.cache_shape(-(-n // 16) + 1, hkv, d), device=DEV)
    table = torch.arange(-(-n // 16), device=DEV, dtype=torch.int32)[None]
    seq = torch.tensor([n], device=DEV)
    query = torch.randn(1, hkv * 2, d, device=DEV)
    out = T.hsa_select_pages(query, kv, layout, table, seq, seq, seq, d, 5)
    assert out.count.tolist() == [[5, 5]]
    assert (out.index[0, :, :5] == torch.arange(5, device=DEV)).all()


@triton.jit
def _radix_probe(keys_ptr, n, k, out_ptr, CHUNK: tl.constexpr, IN_REGS: tl.constexpr, W: tl.constexpr):
    if IN_REGS:  # a chunk's keys in registers
        c = tl.arange(0, CHUNK)
        key = tl.load(keys_ptr + c, mask=c < n, other=-1)
        top_hist = tl.histogram(key >> 24, 128, mask=key >= 0)
        threshold, shift, take_equal = _radix_refine(key, n, top_hist, k, CHUNK, True, W)
    else:  # candidates in memory (the merge of a long request's chunks at large k)
        top_hist = _digit_hist(keys_ptr, n, tl.zeros([], tl.int32), 24, 31, CHUNK, False)
        threshold, shift, take_equal = _radix_refine(keys_ptr, n, top_hist, k, CHUNK, False, W)
    tl.store(out_ptr, threshold)
    tl.store(out_ptr + 1, shift)
    tl.store(out_ptr + 2, take_equal)


def _radix_cases():
    """(keys, k, full): whether the k-th key has equals at full precision (ties broken by
    position, so every radix pass runs)."""
    g = torch.Generator().manual_seed(3)
    spread = torch.rand(300, generator=g) * 2.0 ** torch.randint(-20, 0, (300,), generator=g).float()
    one = torch.tensor(0.0123, dtype=torch.float32).view(torch.int32)
    close = one + 1 + torch.randperm(1 << 12, generator=g)[:200].int()  # above `one`, mostly same top 20 bits
    tied = torch.full((50,), int(one), dtype=torch.int32)
    absent = torch.full((7,), -1, dtype=torch.int32)
    return [
        (spread.view(torch.int32), 37, False),
        (torch.cat([close, absent]), 91, False),
        (torch.cat([tied, absent, close]), 230, True),  # all of close, 30 of the 50 tied
        (torch.cat([close[:1], tied]), 20, True),  # the k-th key has 49 equals below it
        (spread.view(torch.int32), 300, False),  # every present key
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("chunk,in_regs", [(16, False), (512, False), (512, True)])
@pytest.mark.parametrize("digit_bits", [4, 8])
def test_radix_select_is_exact(case, chunk, in_regs, digit_bits):
    """The threshold the top-k kernel's radix select returns picks exactly the k largest keys
    (prefix above, then the first take_equal equal prefixes), whatever pass it stops at."""
    keys, k, full = _radix_cases()[case]
    keys = keys[torch.randperm(keys.numel())].to(DEV)
    out = torch.zeros(3, dtype=torch.int32, device=DEV)
    _radix_probe[(1,)](keys, keys.numel(), k, out, CHUNK=chunk, IN_REGS=in_regs, W=digit_bits)
    threshold, shift, take_equal = out.tolist()
    prefix = keys.long() >> shift
    above = (keys >= 0) & (prefix > (threshold >> shift))
    equal = (keys >= 0) & (prefix == (threshold >> shift))
    assert 0 <= take_equal <= int(equal.sum()) and int(above.sum()) + take_equal == k
    chosen = keys[above | (equal & (equal.cumsum(0) <= take_equal))]
    assert torch.equal(chosen.sort().values, keys[keys >= 0].sort().values[-k:])
    if full:
        assert shift == 0 and take_equal < int(equal.sum())


# ---------------------------------------------------------------------------------------
# Paged sparse attention
# ---------------------------------------------------------------------------------------

ATTN_CASES = [
    # group, block_size, page_size, dtype, num_splits
    (1, 16, 1, torch.float32, None),
    (4, 16, 4, torch.bfloat16, 3),
    (8, 32, 4, torch.float16, None),
    (7, 16, 16, torch.float32, 2),
    (4, 32, 32, torch.bfloat16, 1),
    (9, 32, 2, torch.bfloat16, 4),
]


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("group,block_size,page_size,dtype,num_splits", ATTN_CASES)
def test_paged_sparse_attention(group, block_size, page_size, dtype, num_splits, d):
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(group, block_size, page_size, dtype, d, group * 17 + page_size)
    index, count = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
    index = torch.cat([index, torch.full_like(index, 12345)], dim=-1)  # garbage past count is never read
    # a hole (-1) in the middle of a list, a KV head with nothing chosen
    index[0, 0, 1] = -1
    count = count.clone()
    count[2, 1] = 0
    # a few chosen pages that straddle the evicted gap / the end of the sequence
    index[3, 0, count[3, 0] - 1] = int(gap[3]) // page_size
    index[1, 1, count[1, 1] - 1] = (int(seq[1]) - 1) // page_size
    poison_dead_tokens(kv, layout, table, seq, keep, gap)
    scale = d**-0.5
    ref = R.paged_sparse_attention(query, kv, layout, table, index, count, seq, keep, gap, scale)
    out = T.paged_sparse_attention(query, kv, layout, table, index, count, seq, keep, gap, scale, num_splits=num_splits)
    assert out.dtype == query.dtype and out.shape == query.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < tol(dtype)
    g = group
    assert (out[2, g : 2 * g] == 0).all()  # head 1 of request 2 chose nothing
    assert (out[-1] == 0).all()  # empty selection
    assert float(out.float().abs().max()) < POISON / 10  # dead values never leak in
    into = torch.full_like(query, float("nan"))
    assert T.paged_sparse_attention(query, kv, layout, table, index, count, seq, keep, gap, scale, num_splits=num_splits, out=into) is into
    assert torch.equal(into, out)


@pytest.mark.parametrize("num_splits", [None, 8])
def test_every_page_rows_attend_their_live_pages_without_a_list(num_splits, poisoned_scratch):
    """Rows whose budget is EVERY_PAGE get no page list from the selection, and the attention
    (given the budgets) reads every live page of theirs, around the evicted gap, whatever the
    list holds; the other rows of the batch keep their HSA selection. Splits beyond a row's
    work stay empty (8 splits over rows that fill one)."""
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(4, 16, 2, torch.float32, HEAD_DIMS[0], 77)
    every = torch.tensor([False, True, False, True, True], device=DEV)
    top_pages = torch.where(every, R.EVERY_PAGE, tp)
    selection = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, top_pages)
    assert (selection.count[every] == 0).all()
    ref_selection = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, top_pages)
    assert torch.equal(selection.count, ref_selection.count)
    index = selection.index.clone()
    index[every] = 12345  # never read for these rows
    poison_dead_tokens(kv, layout, table, seq, keep, gap)
    scale = HEAD_DIMS[0] ** -0.5
    out = T.paged_sparse_attention(query, kv, layout, table, index, selection.count, seq, keep, gap, scale,
                                   num_splits=num_splits, top_pages=top_pages)
    ref = R.paged_sparse_attention(query, kv, layout, table, selection.index, selection.count, seq, keep, gap, scale,
                                   top_pages=top_pages)
    assert rel_err(out, ref) < tol(torch.float32)
    every_page = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, 1 << 30)  # lists of all live pages
    exact = R.paged_sparse_attention(query, kv, layout, table, every_page.index, every_page.count, seq, keep, gap, scale)
    assert rel_err(out[every], exact[every]) < tol(torch.float32)
    assert rel_err(out[~every], exact[~every]) > tol(torch.float32)  # (the HSA rows did select)
    assert float(out.abs().max()) < POISON / 10


def test_attention_splits_more_only_where_sms_would_idle():
    from rocketkv_vllm.kernels.triton_attention import default_splits

    # an H200 or H100 (132 SMs), 8 KV heads: batch 1 leaves SMs idle at 16 splits, batch 3 and 8 do not
    assert [default_splits(b * 8, 132) for b in (1, 3, 8, 64)] == [64, 16, 16, 3]
    assert default_splits(1, 132) == 64 and default_splits(9, 132) == 16  # one KV head


def test_paged_sparse_attention_reduce_in_steps(monkeypatch):
    """More splits than the reduce combines at once: the running max / sum carry across steps."""
    from rocketkv_vllm.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "REDUCE_SPLIT_CHUNK", 2)
    layout, kv, table, seq, keep, gap, query, tc, _ = _select_inputs(4, 16, 1, torch.float32, HEAD_DIMS[0], 21)
    index, count = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, 1 << 30)  # every live page
    scale = HEAD_DIMS[0] ** -0.5
    ref = R.paged_sparse_attention(query, kv, layout, table, index, count, seq, keep, gap, scale)
    out = T.paged_sparse_attention(query, kv, layout, table, index, count, seq, keep, gap, scale, num_splits=5,
                                   tokens_per_iter=16)
    assert rel_err(out, ref) < tol(torch.float32)


# ---------------------------------------------------------------------------------------
# SnapKV window scores and compaction
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,prompt_len,group,dtype",
    [(8, 45, 4, torch.float32), (16, 100, 1, torch.bfloat16), (5, 70, 7, torch.float32), (32, 64, 8, torch.float16)],
)
def test_snapkv_window_scores(w, prompt_len, group, dtype):
    torch.manual_seed(w + prompt_len)
    hkv, d = 2, HEAD_DIMS[-1]
    prompt_len *= SCALE
    q = torch.randn(w, hkv * group, d, device=DEV).to(dtype)
    k = torch.randn(prompt_len + 9, hkv, d, device=DEV).to(dtype)
    ref = window_scores(q, k, prompt_len)
    out = T.snapkv_window_scores(q, k, prompt_len)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-3)
    out = T.snapkv_window_scores(q, k, prompt_len, scale=0.3, num_splits=3)
    assert rel_err(out, window_scores(q, k, prompt_len, scale=0.3)) < (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize(
    "block_size,page_size,prompt_len,keep,dtype",
    [(16, 4, 70, 23, torch.float32), (16, 1, 64, 40, torch.bfloat16), (32, 8, 100, 33, torch.float32),
     (16, 16, 50, 17, torch.bfloat16), (32, 32, 96, 64, torch.float16), (16, 2, 30, 30, torch.float32)],
)
def test_compact_kept_tokens(block_size, page_size, prompt_len, keep, dtype):
    torch.manual_seed(prompt_len + keep)
    layout = KVLayout(block_size, page_size)
    hkv, d = 3, HEAD_DIMS[0]
    prompt_len, keep = prompt_len * SCALE, keep * SCALE
    kv_ref, table, _, _ = build_cache(layout, hkv, d, [prompt_len, 20], dtype)
    kv_tri = kv_ref.clone()
    kept = torch.stack([torch.randperm(prompt_len, device=DEV)[: min(keep, prompt_len)].sort().values for _ in range(hkv)])
    kept[0] = torch.arange(kept.shape[1], device=DEV)  # head 0 keeps a prefix (in place)
    R.compact_kept_tokens(kv_ref, layout, table[0], kept, prompt_len)
    T.compact_kept_tokens(kv_tri, layout, table[0], kept, prompt_len)
    assert same_cache(kv_tri, kv_ref)
    # decode tokens after compaction extend the cleared tail pages the same way
    pos = torch.arange(prompt_len, prompt_len + 3, device=DEV)
    slots = table[0, pos // block_size].long() * block_size + pos % block_size
    k, v = torch.randn(3, hkv, d, device=DEV), torch.randn(3, hkv, d, device=DEV)
    R.write_kv(kv_ref, layout, k, v, slots)
    T.write_kv(kv_tri, layout, k, v, slots)
    assert same_cache(kv_tri, kv_ref)


# ---------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------


def test_get_ops_dispatch(monkeypatch):
    from rocketkv_vllm import kernels

    names = kernels.OP_NAMES
    monkeypatch.delenv("ROCKETKV_TRITON_INTERPRET", raising=False)
    cpu = kernels.get_ops("cpu")
    assert cpu.backend == "reference" and cpu.hsa_select_pages is R.hsa_select_pages
    assert all(callable(getattr(cpu, n)) for n in names)
    monkeypatch.setenv("ROCKETKV_TRITON_INTERPRET", "1")
    if CUDA:  # triton was imported compiling: the interpreter cannot be switched on any more
        kernels._ops_for.cache_clear()
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 from process start"):
            kernels.get_ops(torch.device("cpu"))
        gpu = kernels.get_ops("cuda")
        assert gpu.backend in ("triton", "triton+cuda")
        assert all(callable(getattr(gpu, n)) for n in names)
    else:
        interp = kernels.get_ops(torch.device("cpu"))
        assert interp.backend == "triton" and interp.paged_sparse_attention is T.paged_sparse_attention
        assert all(callable(getattr(interp, n)) for n in names)


def test_cuda_write_kv_hands_narrow_summary_groups_to_triton(monkeypatch):
    """With the CUDA extension, write_kv runs the CUDA C++ kernel unless the summary groups
    are narrower than a 16-byte vector (there the Triton kernel measured faster)."""
    from rocketkv_vllm import kernels
    from rocketkv_vllm.kernels import cuda_ops, triton_ops

    calls = []
    monkeypatch.setattr(cuda_ops, "write_kv", lambda *args: calls.append("cuda"))
    monkeypatch.setattr(triton_ops, "write_kv", lambda *args: calls.append("triton"))
    cases = [(0, torch.bfloat16, "cuda"), (8, torch.bfloat16, "cuda"), (4, torch.bfloat16, "triton"),
             (1, torch.bfloat16, "triton"), (4, torch.float32, "cuda"), (1, torch.float32, "triton")]
    for group, dtype, _ in cases:
        layout = KVLayout(16, 4, group)
        kv = torch.empty(layout.cache_shape(1, 1, 64), dtype=dtype)
        kernels._cuda_write_kv_where_it_wins(kv, layout, kv, kv, kv)
    assert calls == [expected for _, _, expected in cases]


# ---------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_select_and_attend(dtype):
    """One captured graph replays correctly as lengths, budgets and queries change."""
    torch.manual_seed(3)
    group, d = 4, 128
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(group, 16, 4, dtype, d, 11)
    seq, keep, gap = seq.int(), keep.int(), gap.int()
    tc, tp = tc.int(), tp.int()
    scale = d**-0.5

    def step():
        sel = T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
        return sel, T.paged_sparse_attention(query, kv, layout, table, sel.index, sel.count, seq, keep, gap, scale)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_sel, static_out = step()
    for trial in range(3):
        if trial:
            query.copy_(torch.randn_like(query))
            seq.copy_((seq - 3 * trial).clamp(min=1))
            keep.copy_(torch.minimum(keep, seq))
            gap.copy_(torch.minimum(gap, seq))
            tp.copy_(torch.roll(tp, 1))
        graph.replay()
        torch.cuda.synchronize()
        sel, out = step()
        assert torch.equal(static_sel.count, sel.count)
        assert torch.equal(static_out, out)
        ref_sel = R.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp)
        scores, _ = oracle_scores(query, kv, layout, table, seq, keep, gap, tc)
        assert_same_selection(static_sel, ref_sel, scores)
        poisoned = kv.clone()
        poison_dead_tokens(poisoned, layout, table, seq, keep, gap)
        ref = R.paged_sparse_attention(query, poisoned, layout, table, static_sel.index, static_sel.count, seq, keep, gap, scale)
        assert rel_err(static_out, ref) < tol(dtype)


TOPK_CASES = [
    # group, chunk, tied, then per request: (kept pages, evicted-gap pages, tail pages, k)
    (4, 4096, False, [(5000, 0, 0, 64), (100, 1900, 200, 500), (9000, 0, 0, 7)]),  # candidates in shared memory
    (4, 4096, False, [(20000, 0, 0, 3000), (1200, 0, 0, 1200)]),  # 5 x 3000 candidates merged from global memory; k = n
    # k = 0: none; k > n: all; nothing live; EVERY_PAGE: no list (the attention enumerates the pages)
    (1, 4096, False, [(1000, 0, 0, 0), (50, 0, 0, 60), (0, 0, 0, 5), (300, 20, 9, R.EVERY_PAGE)]),
    (3, 16, True, [(700, 0, 0, 13), (90, 10, 30, 40)]),  # every score tied (lowest pages win), 16-page chunks
    (16, 4096, False, [(17000, 0, 0, 100), (8192, 0, 0, 8191)]),  # a wide group; k = n - 1
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(TOPK_CASES)))
def test_cuda_cpp_topk_matches_triton(case, poisoned_scratch):
    """The CUDA C++ top-k picks the Triton top-k's pages (or pages of equal score) and the
    same keys, from the same page logits: one or many chunks, candidates merged in shared or
    global memory, requests with an evicted gap, k of 0, k covering every page, ties; launched
    with and without programmatic dependent launch."""
    from rocketkv_vllm.kernels import cuda_ops, triton_hsa

    if not cuda_ops.available():
        pytest.skip(f"rocketkv_vllm._C not built: {cuda_ops.import_error()}")
    group, chunk, tied, requests = TOPK_CASES[case]
    torch.manual_seed(case)
    hkv, ps = 3, 4
    npv = max(kept + tail for kept, _, tail, _ in requests) + 5
    batch = len(requests)
    keep = torch.tensor([kept * ps for kept, _, _, _ in requests], dtype=torch.int32, device=DEV)
    gap = torch.tensor([(kept + evicted) * ps for kept, evicted, _, _ in requests], dtype=torch.int32, device=DEV)
    seq = gap + torch.tensor([tail * ps for _, _, tail, _ in requests], dtype=torch.int32, device=DEV)
    k = torch.tensor([r[3] for r in requests], dtype=torch.int32, device=DEV)
    live = torch.tensor([kept + tail for kept, _, tail, _ in requests], device=DEV)
    # the newest page, appended to the lists of every other request (the page after the tail)
    newest = torch.tensor([kept + evicted + tail if i % 2 == 0 else -1 for i, (kept, evicted, tail, _) in enumerate(requests)],
                          dtype=torch.int32, device=DEV)
    logits = torch.randn(batch, hkv, group, npv, device=DEV) * 3
    if tied:
        logits.zero_()
    masked = logits.masked_fill(torch.arange(npv, device=DEV) >= live[:, None, None, None], float("-inf"))
    m = masked.amax(-1)
    # one part of softmax statistics per request and KV head: [B, Hkv, 1, 2, np2(group)]
    stats = torch.zeros(batch, hkv, 1, 2, triton.next_power_of_2(group), device=DEV)
    stats[:, :, 0, 0] = float("-inf")
    stats[:, :, 0, 0, :group] = m
    stats[:, :, 0, 1, :group] = (masked - m[..., None].nan_to_num(neginf=0)).exp().sum(-1)
    outs = {}
    for name in ("triton", "cuda"):
        index = torch.full((batch, hkv, npv), -5, dtype=torch.int32, device=DEV)
        count = torch.full((batch, hkv), -5, dtype=torch.int32, device=DEV)
        keys = torch.full((batch, hkv, npv), -5, dtype=torch.int32, device=DEV)
        args = (logits, stats, seq, keep, gap, k, ps, index, count, keys)
        if name == "cuda":
            # (with and without a programmatic dependent launch: SelectionPlan.pdl)
            cuda_ops.top_pages_from_logits(*args, chunk=chunk, newest_page=newest, pdl=case % 2 == 0)
        else:
            triton_hsa.top_pages_from_logits(*args, newest_page=newest)
        outs[name] = R.PageSelection(index, count), keys
    (got, got_keys), (ref, ref_keys) = outs["cuda"], outs["triton"]
    scores = torch.full((batch, hkv, npv * 2), float("-inf"), device=DEV)
    for b, (kept, evicted, tail, kb) in enumerate(requests):
        n = kept + tail
        if kb < n:  # keys are written only where pages are scored
            torch.testing.assert_close(got_keys[b, :, :n].view(torch.float32), ref_keys[b, :, :n].view(torch.float32),
                                       rtol=1e-5, atol=1e-35)  # fast-math flushes subnormals
        logical = torch.cat([torch.arange(kept), torch.arange(kept + evicted, kept + evicted + tail)]).to(DEV)
        scores[b][:, logical] = ref_keys[b, :, :n].view(torch.float32) if kb < n else 0.0
    assert_same_selection(got, ref, scores)
    every = k.cpu() == R.EVERY_PAGE
    listed = torch.where(every, 0, torch.minimum(k.cpu(), live.cpu()) + (newest.cpu() >= 0).long())
    assert torch.equal(got.count.cpu(), listed[:, None].expand(batch, hkv).int())


def _misaligned(x):
    """The same values one element into a wider tensor: rows no longer 16-byte aligned."""
    wide = torch.empty(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    wide[..., 1:] = x
    return wide[..., 1:]


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,page_size,d,misaligned", [
    (16, 1, 128, False), (16, 4, 128, False), (32, 8, 128, False), (32, 32, 128, False),
    (16, 4, 72, False),  # 16-byte accesses, head_dim not a power of two
    (16, 4, 128, True),  # one channel a thread
    (16, 4, 40, True),  # one channel a thread, several (token, head) pairs per CUDA block
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("summary_group", [0, 8, 4, 1])  # 4, 1: narrower than 16 bytes (one channel a thread)
def test_cuda_cpp_write_kv(block_size, page_size, d, misaligned, dtype, summary_group):
    from rocketkv_vllm.kernels import cuda_ops

    if not cuda_ops.available():
        pytest.skip(f"rocketkv_vllm._C not built: {cuda_ops.import_error()}")
    torch.manual_seed(block_size + page_size)
    layout = KVLayout(block_size, page_size, summary_group)
    hkv = 8
    rows = _misaligned if misaligned else (lambda x: x)
    lengths = [1000, 77, 513]
    _, table, keys, values = build_cache(layout, hkv, d, lengths, dtype)
    num_blocks = int(table.max()) + 3
    kv_ref = torch.full(layout.cache_shape(num_blocks, hkv, d), float("nan"), dtype=dtype, device=DEV)
    # stale summaries of a reused block: a page's first write must restart them, not widen them
    layout.page_max(kv_ref).fill_(100.0)
    layout.page_min(kv_ref).fill_(-100.0)
    kv_cpp = kv_ref.clone()
    bs = block_size
    prompt = [n - 4 for n in lengths]
    for i, n in enumerate(prompt):
        pos = torch.arange(n, device=DEV)
        slots = table[i, pos // bs].long() * bs + pos % bs
        for c in pos.split(256 if i else 37):
            for kv, fn in ((kv_ref, R.write_kv), (kv_cpp, cuda_ops.write_kv)):
                fn(kv, layout, rows(keys[i][c]), rows(values[i][c]), slots[c] if i != 1 else slots[c].int())
    for step in range(4):
        pos = torch.tensor([p + step for p in prompt], device=DEV)
        slots = table[torch.arange(3, device=DEV), pos // bs].long() * bs + pos % bs
        slots = torch.cat([slots, torch.tensor([-1], device=DEV)])
        k = torch.stack([keys[i][prompt[i] + step] for i in range(3)] + [keys[0][0]])
        v = torch.stack([values[i][prompt[i] + step] for i in range(3)] + [values[0][0]])
        for kv, fn in ((kv_ref, R.write_kv), (kv_cpp, cuda_ops.write_kv)):
            fn(kv, layout, rows(k), rows(v), slots)
    assert same_cache(kv_cpp, kv_ref)
