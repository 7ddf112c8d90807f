"""FlashInfer inputs for draft trees, checked against the reference math without
FlashInfer: the packed masks are unpacked the way FlashInfer's kernels read them (byte
``indptr[r] + bit // 8``, little-endian bit ``bit % 8``), and FlashInfer's calls are
emulated in torch from the built inputs (paged prefill with an optional packed mask,
returning the log-sum-exp; ragged prefill; the LSE merge of ``merge_state``), which must
give ``tree_attention.reference``. With flashinfer and a GPU the same cases run through
FlashInfer itself (GPU-only tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spec_plugins.kernels import flashinfer_tree as fi
from spec_plugins.kernels import tree_attention as ta

H, KVH, D, PS = 4, 2, 16, 8


def random_parents(rng, n):
    return [-1 if i == 0 else int(rng.integers(-1, i)) for i in range(n)]


def batch(seed, sizes, prefixes, ps=PS, extra_rows=0, d=D):
    """Paged K/V ``[pages, ps, KVH, D]`` (FlashInfer's NHD), random pages per request,
    the requests at scattered rows of a larger table."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    need = [(p + n + 1 + ps - 1) // ps for p, n in zip(prefixes, sizes)]
    pages = sum(need) + 2
    key = torch.randn(pages, ps, KVH, d, generator=g)
    value = torch.randn(pages, ps, KVH, d, generator=g)
    rows = rng.permutation(len(sizes) + extra_rows)[:len(sizes)]
    table = torch.full((len(sizes) + extra_rows, max(need) + 1), -1, dtype=torch.int32)
    perm = rng.permutation(pages)
    used = 0
    for r, k in enumerate(need):
        table[rows[r], :k] = torch.from_numpy(perm[used:used + k].astype(np.int32))
        used += k
    parents = [random_parents(rng, n) for n in sizes]
    q = torch.randn(sum(n + 1 for n in sizes), H, d, generator=g)
    return key, value, table, rows, parents, q


def reference(prefixes, parents, table, rows, ps, q, key, value, scale):
    return ta.reference(prefixes, parents, table[torch.as_tensor(rows)], ps, q,
                        key.permute(0, 2, 3, 1), value.permute(0, 2, 1, 3), scale)


def unpack(mask: fi.PackedMasks, r: int, shape) -> np.ndarray:
    """Request r's mask as FlashInfer reads it."""
    lo, hi = int(mask.indptr[r]), int(mask.indptr[r + 1])
    bits = np.unpackbits(mask.bits[lo:hi].numpy(), bitorder="little")
    n = shape[0] * shape[1]
    assert not bits[n:].any()                        # padding to the byte is zero
    return bits[:n].reshape(shape).astype(bool)


# ---- torch emulation of the FlashInfer calls (the reference for merge_state too) ----

def attend(q, k, v, visible, scale):
    """q [Q, H, D], k/v [L, KVH, D], visible [Q, L] -> (o [Q, H, D], lse [Q, H])."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = torch.einsum("qhd,lhd->hql", q.double(), k) * scale
    s = s.masked_fill(~torch.as_tensor(visible)[None], float("-inf"))
    lse = torch.logsumexp(s, -1)                                  # [H, Q]
    o = torch.einsum("hql,lhd->qhd", torch.softmax(s, -1), v)
    return o, lse.T


def paged_prefill(q, key, value, paged: fi.PagedInputs, ps, scale, mask=None):
    o, lse = [], []
    qo, kvp = paged.qo_indptr.tolist(), paged.paged_kv_indptr.tolist()
    for r in range(len(qo) - 1):
        pages = paged.paged_kv_indices[kvp[r]:kvp[r + 1]].long()
        kv_len = (len(pages) - 1) * ps + int(paged.paged_kv_last_page_len[r])
        k = key[pages].reshape(-1, KVH, D)[:kv_len]
        v = value[pages].reshape(-1, KVH, D)[:kv_len]
        nq = qo[r + 1] - qo[r]
        vis = np.ones((nq, kv_len), bool) if mask is None else unpack(mask, r, (nq, kv_len))
        a, b = attend(q[qo[r]:qo[r + 1]], k, v, vis, scale)
        o.append(a)
        lse.append(b)
    return torch.cat(o), torch.cat(lse)


def ragged_prefill(q, k, v, indptr, mask, scale):
    o, lse = [], []
    ip = indptr.tolist()
    for r in range(len(ip) - 1):
        n = ip[r + 1] - ip[r]
        a, b = attend(q[ip[r]:ip[r + 1]], k[ip[r]:ip[r + 1]], v[ip[r]:ip[r + 1]],
                      unpack(mask, r, (n, n)), scale)
        o.append(a)
        lse.append(b)
    return torch.cat(o), torch.cat(lse)


def merge_states(o_a, lse_a, o_b, lse_b):
    """What flashinfer.cascade.merge_state computes (natural log here)."""
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - m)[..., None], torch.exp(lse_b - m)[..., None]
    return (o_a * wa + o_b * wb) / (wa + wb), m + torch.log(wa + wb)[..., 0]


# Ragged trees whose q x kv and q x q bit counts are not multiples of 8, so offsets in
# bits and in bytes differ from the second request on (the batch > 1 pitfall).
CASES = {
    "ragged": ([5, 0, 9, 3], [13, 4, 21, 8], 0),
    "scattered_rows": ([6, 2], [30, 7], 3),
    "wide_tree": ([40, 1], [3, 17], 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_custom_mask_inputs(name):
    sizes, prefixes, extra = CASES[name]
    key, value, table, rows, parents, q = batch(1, sizes, prefixes, extra_rows=extra)
    inp = fi.custom_mask_inputs(prefixes, parents, table, PS, rows=rows)
    anc = ta.ancestor_masks(parents)
    bits = [(n + 1) * (p + n + 1) for n, p in zip(sizes, prefixes)]
    assert inp.mask.indptr.tolist() == np.concatenate(
        [[0], np.cumsum([(b + 7) // 8 for b in bits])]).tolist()
    pg = inp.paged
    for r, (m, p0) in enumerate(zip(anc, prefixes)):
        want = np.ones((m.shape[0], p0 + m.shape[0]), bool)
        want[:, p0:] = m
        assert np.array_equal(unpack(inp.mask, r, want.shape), want)
        pages = pg.paged_kv_indices[pg.paged_kv_indptr[r]:pg.paged_kv_indptr[r + 1]]
        kv_len = p0 + m.shape[0]
        assert pages.tolist() == table[rows[r], :(kv_len + PS - 1) // PS].tolist()
        assert (len(pages) - 1) * PS + int(pg.paged_kv_last_page_len[r]) == kv_len
    out, _ = paged_prefill(q, key, value, pg, PS, 0.3, inp.mask)
    want = reference(prefixes, parents, table, rows, PS, q, key, value, 0.3)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_split_and_merge_equals_reference(name):
    sizes, prefixes, extra = CASES[name]
    key, value, table, rows, parents, q = batch(2, sizes, prefixes, extra_rows=extra)
    inp = fi.split_inputs(prefixes, parents, table, PS, rows=rows)
    anc = ta.ancestor_masks(parents)
    for r, m in enumerate(anc):
        assert np.array_equal(unpack(inp.mask, r, m.shape), m)
    # Each tree token's K/V is read from position prefix + j of its request's pages.
    t = 0
    for r, (n, p0) in enumerate(zip(sizes, prefixes)):
        for j in range(n + 1):
            pos = p0 + j
            assert int(inp.tree_pages[t]) == int(table[rows[r], pos // PS])
            assert int(inp.tree_offsets[t]) == pos % PS
            t += 1
    o_prefix, lse_prefix = paged_prefill(q, key, value, inp.prefix, PS, 0.3)
    tk = key[inp.tree_pages, inp.tree_offsets]
    tv = value[inp.tree_pages, inp.tree_offsets]
    o_tree, lse_tree = ragged_prefill(q, tk, tv, inp.tree_indptr, inp.mask, 0.3)
    out, _ = merge_states(o_prefix, lse_prefix, o_tree, lse_tree)
    want = reference(prefixes, parents, table, rows, PS, q, key, value, 0.3)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_token_slot_cache_is_page_size_one():
    """SGLang: req_to_token rows as the block table, pages of one token."""
    sizes, prefixes = [4, 7], [9, 15]
    key, value, table, rows, parents, q = batch(3, sizes, prefixes, ps=1, extra_rows=2)
    want = reference(prefixes, parents, table, rows, 1, q, key, value, 0.25)
    inp = fi.custom_mask_inputs(prefixes, parents, table, 1, rows=torch.as_tensor(rows))
    assert (inp.paged.paged_kv_last_page_len == 1).all()
    out, _ = paged_prefill(q, key, value, inp.paged, 1, 0.25, inp.mask)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    sp = fi.split_inputs(prefixes, parents, table, 1, rows=rows)
    o_p, l_p = paged_prefill(q, key, value, sp.prefix, 1, 0.25)
    o_t, l_t = ragged_prefill(q, key[sp.tree_pages, sp.tree_offsets],
                              value[sp.tree_pages, sp.tree_offsets], sp.tree_indptr,
                              sp.mask, 0.25)
    torch.testing.assert_close(merge_states(o_p, l_p, o_t, l_t)[0], want, atol=1e-10, rtol=0)


def test_split_needs_a_prefix():
    with pytest.raises(ValueError, match="at least one token"):
        fi.split_inputs([0, 4], [[-1], []], torch.zeros(2, 2, dtype=torch.int32), PS)


gpu = pytest.mark.skipif(fi.unavailable_reason() is not None,
                         reason=str(fi.unavailable_reason()))


@gpu
@pytest.mark.parametrize("mode", fi.MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_flashinfer_equals_reference(mode, name):
    """FlashInfer itself, batch > 1, bf16 (its custom-mask path is FA2: 16-bit only),
    head_dim 128 (a size FlashInfer compiles; the benchmark's, so one JIT build)."""
    sizes, prefixes, extra = CASES[name]
    key, value, table, rows, parents, q = batch(4, sizes, prefixes, ps=16, extra_rows=extra,
                                                d=128)
    dt = torch.bfloat16
    key, value, q = key.to(dt), value.to(dt), q.to(dt)
    want = reference(prefixes, parents, table, rows, 16, q.float(), key.float(),
                     value.float(), 0.3)
    w = fi.Wrappers("cuda", mode)
    p = fi.plan(w, prefixes, parents, table.cuda(), 16, H, KVH, 128, dt, 0.3, rows=rows)
    out = fi.run(p, q.cuda(), key.cuda(), value.cuda())
    torch.testing.assert_close(out.float().cpu().double(), want, atol=2e-2, rtol=0)
