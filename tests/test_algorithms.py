"""Reference algorithms against brute-force float64 versions written independently."""
import math

import pytest
import torch

from rocketkv_vllm.algorithms import (
    adaptive_pool_kernel,
    causal_attention,
    exact_topk,
    hsa_select,
    page_summaries,
    pages_to_tokens,
    quest_select,
    snapkv_select,
    sparq_select,
    sparse_attention,
    top_channel_mask,
    update_summaries,
    window_scores,
)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def brute_window_scores(q, k, prompt_len):
    w, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.zeros(hkv, prompt_len, dtype=torch.float64)
    for i in range(w):
        pos = prompt_len - w + i
        for h in range(hq):
            logits = [float(q[i, h].double() @ k[j, h // (hq // hkv)].double()) / math.sqrt(d) for j in range(pos + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            s = sum(e)
            for j in range(pos + 1):
                out[h // (hq // hkv), j] += e[j] / s
    return out


@pytest.mark.parametrize("group", [1, 4, 8])
def test_window_scores_match_brute_force(group):
    torch.manual_seed(group)
    hkv, d, length, w = 2, 16, 40, 6
    q = torch.randn(w, hkv * group, d)
    k = torch.randn(length + 3, hkv, d)
    assert rel_err(window_scores(q, k, length), brute_window_scores(q, k, length)) < 1e-5


def test_snapkv_keeps_planted_tokens_and_window():
    torch.manual_seed(0)
    hkv, group, d, length, w = 2, 4, 32, 300, 16
    keys = torch.randn(length, hkv, d) * 0.1
    queries = torch.randn(w, hkv * group, d) * 0.1
    planted = {0: [17, 120, 250], 1: [5, 199]}
    for h, positions in planted.items():
        direction = queries[:, h * group : (h + 1) * group].mean(dim=(0, 1))
        for p in positions:
            keys[p, h] = direction / direction.norm() * 12
    kept = snapkv_select(queries, keys, length, keep=40, pool_kernel=7)
    assert kept.shape == (hkv, 40)
    for h, positions in planted.items():
        row = kept[h].tolist()
        assert row == sorted(row) and len(set(row)) == 40
        assert set(positions) <= set(row)
        assert set(range(length - w, length)) <= set(row)


def test_snapkv_matches_brute_force_pooling_and_topk():
    torch.manual_seed(1)
    hkv, group, d, length, w, keep, kernel = 2, 2, 8, 50, 5, 15, 5
    q, k = torch.randn(w, hkv * group, d), torch.randn(length, hkv, d)
    scores = brute_window_scores(q, k, length)[:, : length - w]
    pooled = torch.stack([torch.tensor([scores[h, max(0, i - 2) : i + 3].max() for i in range(length - w)]) for h in range(hkv)])
    kept = snapkv_select(q, k, length, keep, pool_kernel=kernel)
    for h in range(hkv):
        expected = set(pooled[h].topk(keep - w).indices.tolist()) | set(range(length - w, length))
        assert set(kept[h].tolist()) == expected


def test_snapkv_budget_larger_than_prompt_and_short_prompts():
    q, k = torch.randn(4, 4, 8), torch.randn(10, 2, 8)
    assert torch.equal(snapkv_select(q, k, 10, keep=64), torch.arange(10).expand(2, -1))
    with pytest.raises(ValueError, match="keep"):
        snapkv_select(q, k, 10, keep=0)
    with pytest.raises(ValueError, match="window"):
        snapkv_select(q, k, 10, keep=3)
    assert adaptive_pool_kernel(10, 63) == 9 and adaptive_pool_kernel(1000, 63) == 63
    with pytest.raises(ValueError, match="odd"):
        adaptive_pool_kernel(100, 4)


@pytest.mark.parametrize("page", [1, 2, 4, 16])
def test_incremental_summaries_equal_batch_summaries(page):
    torch.manual_seed(page)
    keys = torch.randn(37, 3, 8)
    kmax, kmin = page_summaries(keys, page)
    ref_max = torch.stack([keys[i : i + page].double().amax(0) for i in range(0, 37, page)])
    assert torch.equal(kmax.double(), ref_max)
    inc_max = torch.full_like(kmax, 7.0)  # stale garbage must be overwritten by page starts
    inc_min = torch.full_like(kmin, -7.0)
    for chunk in torch.arange(37).split([5, 1, 13, 18]):
        update_summaries(inc_max, inc_min, keys[chunk], chunk, page)
    assert torch.equal(inc_max, kmax) and torch.equal(inc_min, kmin)


def brute_hsa(query, kmax, kmin, page_len, r, k):
    b, hq, d = query.shape
    hkv = kmax.shape[2]
    g = hq // hkv
    out = []
    for bi in range(b):
        heads = []
        for h in range(hkv):
            qs = query[bi, h * g : (h + 1) * g].double()
            imp = qs.abs().mean(0)
            chans = set(sorted(range(d), key=lambda c: -float(imp[c]))[:r])
            probs = torch.zeros(kmax.shape[1], dtype=torch.float64)
            valid = [p for p in range(kmax.shape[1]) if page_len[bi, p] > 0]
            for qi in qs:
                temp = math.sqrt(d * sum(abs(float(qi[c])) for c in chans) / float(qi.abs().sum()))
                logit = {}
                for p in valid:
                    s = sum(float(qi[c]) * float(kmax[bi, p, h, c] if qi[c] > 0 else kmin[bi, p, h, c]) for c in chans)
                    logit[p] = s / temp + math.log(page_len[bi, p])
                m = max(logit.values())
                z = sum(math.exp(v - m) for v in logit.values())
                for p in valid:
                    probs[p] += math.exp(logit[p] - m) / z / g
            heads.append(probs)
        out.append(torch.stack(heads))
    return torch.stack(out)


@pytest.mark.parametrize("group", [1, 4, 8])
def test_hsa_select_matches_brute_force(group):
    torch.manual_seed(10 + group)
    b, hkv, d, pages = 3, 2, 16, 12
    query = torch.randn(b, hkv * group, d)
    keys = torch.randn(b, pages * 4, hkv, d)
    kmax = keys.view(b, pages, 4, hkv, d).amax(2)
    kmin = keys.view(b, pages, 4, hkv, d).amin(2)
    page_len = torch.full((b, pages), 4)
    page_len[1, 9:] = 0  # shorter request
    page_len[2, 2:5] = 0  # evicted gap
    page_len[0, -1] = 2  # partial last page
    r, k = 5, 3
    got = hsa_select(query, kmax, kmin, page_len, r, k)
    probs = brute_hsa(query, kmax, kmin, page_len, r, k)
    for bi in range(b):
        for h in range(hkv):
            expected = set(probs[bi, h].topk(k).indices.tolist())
            assert set(got[bi, h].tolist()) == expected


def test_hsa_ragged_budgets_and_empty_selection():
    torch.manual_seed(3)
    query = torch.randn(3, 8, 16)
    kmax = torch.randn(3, 10, 2, 16)
    kmin = kmax - 1
    page_len = torch.full((3, 10), 4)
    page_len[1, 3:] = 0
    page_len[2] = 0
    got = hsa_select(query, kmax, kmin, page_len, torch.tensor([4, 16, 8]), torch.tensor([2, 6, 5]))
    assert got.shape == (3, 2, 6)
    assert (got[0, :, 2:] == -1).all() and (got[0, :, :2] >= 0).all()
    assert sorted(got[1, 0, :3].tolist()) == [0, 1, 2] and (got[1, :, 3:] == -1).all()
    assert (got[2] == -1).all()


def test_channel_mask_and_invalid_channel_count():
    q = torch.zeros(1, 2, 8)
    q[0, :, 3] = 5
    q[0, :, 6] = -4
    assert top_channel_mask(q, 1, 2)[0, 0].nonzero().flatten().tolist() == [3, 6]
    with pytest.raises(ValueError, match="top_channels"):
        top_channel_mask(q, 1, 9)
    with pytest.raises(ValueError, match="top_channels"):
        top_channel_mask(q, 1, 0)


def test_hsa_recall_against_exact_oracle_on_planted_keys():
    torch.manual_seed(7)
    b, hkv, group, d, length, page = 2, 2, 4, 64, 512, 4
    query = torch.randn(b, hkv * group, d)
    keys = torch.randn(b, length, hkv, d)
    heavy = torch.randint(0, length, (b, hkv, 8))
    for bi in range(b):
        for h in range(hkv):
            direction = query[bi, h * group : (h + 1) * group].mean(0)
            keys[bi, heavy[bi, h], h] += direction * 3
    valid = torch.ones(b, length, dtype=torch.bool)
    oracle = exact_topk(query, keys, valid, 8)
    kmax, kmin = zip(*(page_summaries(keys[bi], page) for bi in range(b)))
    pages = hsa_select(query, torch.stack(kmax), torch.stack(kmin), torch.full((b, length // page), page), 32, 16)
    tokens = pages_to_tokens(pages, page, valid)
    sparq = sparq_select(query, keys, valid, 32, 64)
    quest = pages_to_tokens(quest_select(query, torch.stack(kmax), torch.stack(kmin), torch.full((b, length // page), page), 16), page, valid)
    for selection in (tokens, sparq, quest):
        hits = sum(len(set(oracle[bi, h].tolist()) & set(selection[bi, h].tolist())) for bi in range(b) for h in range(hkv))
        assert hits / oracle.numel() >= 0.9


def test_exact_topk_is_true_attention_ranking():
    torch.manual_seed(4)
    query, keys = torch.randn(1, 4, 8), torch.randn(1, 30, 2, 8)
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, :5] = False
    got = exact_topk(query, keys, valid, 4)
    for h in range(2):
        logits = torch.einsum("gd,ld->gl", query[0, 2 * h : 2 * h + 2].double(), keys[0, :, h].double()) / math.sqrt(8)
        probs = logits.masked_fill(~valid[0], -math.inf).softmax(-1).mean(0)
        assert set(got[0, h].tolist()) == set(probs.topk(4).indices.tolist())


def brute_attention(q, keys, values, positions_per_head, scale):
    hq, d = q.shape
    hkv = keys.shape[1]
    out = torch.zeros(hq, d, dtype=torch.float64)
    for h in range(hq):
        kv = h // (hq // hkv)
        pos = positions_per_head[kv]
        if not pos:
            continue
        logits = torch.stack([q[h].double() @ keys[p, kv].double() * scale for p in pos])
        out[h] = logits.softmax(0) @ torch.stack([values[p, kv].double() for p in pos])
    return out


@pytest.mark.parametrize("group", [1, 4, 8])
def test_sparse_attention_matches_brute_force(group):
    torch.manual_seed(group)
    b, hkv, d, length = 3, 2, 16, 20
    query = torch.randn(b, hkv * group, d)
    keys, values = torch.randn(b, length, hkv, d), torch.randn(b, length, hkv, d)
    index = torch.randint(0, length, (b, hkv, 6))
    index[1, :, 4:] = -1
    index[2, 1] = -1  # empty selection for one head
    out = sparse_attention(query, keys, values, index, 0.25)
    for bi in range(b):
        pos = [[p for p in index[bi, h].tolist() if p >= 0] for h in range(hkv)]
        assert rel_err(out[bi], brute_attention(query[bi], keys[bi], values[bi], pos, 0.25)) < 1e-5
    assert (out[2, group:] == 0).all()


def test_sparse_attention_bf16_within_tolerance():
    torch.manual_seed(5)
    query = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    keys, values = torch.randn(2, 100, 2, 64, dtype=torch.bfloat16), torch.randn(2, 100, 2, 64, dtype=torch.bfloat16)
    index = torch.randint(0, 100, (2, 2, 32))
    out = sparse_attention(query, keys, values, index, 0.125)
    ref = sparse_attention(query.double(), keys.double(), values.double(), index, 0.125)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("group", [1, 4])
def test_causal_attention_matches_brute_force(group):
    torch.manual_seed(group)
    hkv, d, length = 2, 8, 12
    q = torch.randn(4, hkv * group, d)
    keys, values = torch.randn(length, hkv, d), torch.randn(length, hkv, d)
    q_pos = torch.tensor([8, 9, 10, 11])
    out = causal_attention(q, keys, values, q_pos, torch.arange(length), 0.3)
    for t in range(4):
        pos = [list(range(int(q_pos[t]) + 1))] * hkv
        assert rel_err(out[t], brute_attention(q[t], keys, values, pos, 0.3)) < 1e-5
