"""Triton estimation kernels of the stripe estimators (``anchor``).

- ``_anchor_pool_kernel`` (one program per query block and head): mean-pools the query block
  and takes every row's maximum scaled score over its dense keys (sink blocks + local window,
  causally masked); the block anchor is the mean of those row maxima. Reads only the block's Q
  tile and its few dense K tiles.
- ``_stripe_scan_kernel`` (one program per ``QB`` query blocks and output head): scores the
  pooled queries of ``QB`` blocks x the query heads of a group (one ``tl.dot`` of ``QB * GP``
  rows per K tile, so each K tile is read once for all of them) against every reachable key,
  takes the group's maximum of ``score - anchor`` per key, and either (``MODE=0``) sums the
  candidates' weight (``exp(diff)`` for a mass budget, 1 for a count) above ``NT`` thresholds,
  or (``MODE=1``) keeps the candidates with ``diff >= threshold`` and writes their positions
  compacted, in increasing order, with a running count.

``CONFIG`` sets the launches; with ``search_splits`` / ``select_splits`` > 1 the keys are split
over a third grid axis (shorter serial loops for the late query blocks): the search passes add
the splits' sums in torch, the selection first counts per split (``MODE=2``) and then writes
each split from its exclusive prefix.

A budget other than ``theta`` becomes a per-block threshold by an ``NT``-ary search (three
``MODE=0`` passes, optionally over a strided sample of the keys: each sampled candidate then
weighs ``stride`` keys, while the forced sink and local keys are summed exactly; the arithmetic
between passes is torch on the device, no host synchronisation). The threshold is the lower
edge of the finest interval where the budget is reached, so the kept set covers the budget and
exceeds it by at most that interval (0.008 logits).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_SEARCH_LOW = -24.0  # thresholds searched in [low, low + span): e**-24 weighs nothing
_SEARCH_SPAN = 32.0
_NUM_THRESHOLDS = 16  # per pass
_SEARCH_LEVELS = 3  # resolution 32 / 16**3 = 0.008 logits
_MAX_EXP = 30.0  # exp(diff) is clamped here (a pooled score far above its anchor)
# launch configs (module constants so bench/profile_estimate.py can sweep them): pooled rows
# (query blocks x group heads) per program and keys per tile, for the search passes (MODE=0,
# whose [QB, BLOCK_K, NT] compare is the large tensor) and the selection pass (MODE=1); the
# search samples every long_stride-th key beyond long_keys keys. long_stride 32: estimation
# 4.7-4.8% of cuDNN's dense time at 128k on an H100 (6.5-7.1% at stride 8), and on SmolLM2 (8k,
# long_keys lowered to 2048) the same recall and output error as the exact search (0.916 vs
# 0.917 at mass 0.95): bench/RESULTS.md
CONFIG = {"search_rows": 16, "search_block_k": 32, "search_warps": 4,
          "select_rows": 64, "select_block_k": 64, "select_warps": 4,
          "long_keys": 16384, "long_stride": 32, "search_splits": 1, "select_splits": 1}


@triton.jit
def _anchor_pool_kernel(
    Q, K, QBAR, ABAR,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    num_heads, group, seqlen_q, seqlen_k, num_k_blocks, sink_blocks, local_blocks, scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    offset = seqlen_k - seqlen_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_row = offs_m < seqlen_q
    m_d = offs_d < HEAD_DIM
    p_q = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    n_rows = tl.minimum(seqlen_q - pid_m * BLOCK_M, BLOCK_M)
    qbar = tl.sum(b_q.to(tl.float32), axis=0) / n_rows
    nqb = tl.cdiv(seqlen_q, BLOCK_M)
    tl.store(QBAR + (pid_bh * nqb + pid_m) * HEAD_DIM + offs_d, qbar, mask=m_d)

    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, seqlen_q - 1) + offset
    diag = tl.minimum(last // BLOCK_N, num_k_blocks - 1)
    first_local = tl.maximum(diag - local_blocks + 1, 0)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    # the sink blocks below the window, then the window: each dense block once
    for phase in tl.static_range(2):
        if phase == 0:
            lo = 0
            hi = tl.minimum(sink_blocks, first_local)
        else:
            lo = first_local
            hi = diag + 1
        for kb in range(lo, hi):
            offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
            m_col = offs_n < seqlen_k
            b_k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                          mask=m_col[:, None] & m_d[None, :], other=0.0)
            s = tl.dot(b_q, tl.trans(b_k)).to(tl.float32) * scale  # [BLOCK_M, BLOCK_N]
            ok = m_col[None, :] & m_row[:, None]
            if IS_CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
            row_max = tl.maximum(row_max, tl.max(tl.where(ok, s, float("-inf")), axis=1))
    seen = row_max > float("-inf")
    total = tl.sum(tl.where(seen, row_max, 0.0), axis=0)
    n_seen = tl.sum(seen.to(tl.float32), axis=0)
    tl.store(ABAR + pid_bh * nqb + pid_m, total / tl.maximum(n_seen, 1.0))


@triton.jit
def _group_diff(k_base, offs_k, hi, stride_ks, b_qbar, b_abar, scale, offs_d, m_d,
                QB: tl.constexpr, GP: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[QB, BLOCK_K]``: the group's maximum of ``score - anchor`` at keys ``offs_k``."""
    b_k = tl.load(k_base + offs_k[:, None] * stride_ks + offs_d[None, :],
                  mask=(offs_k < hi)[:, None] & m_d[None, :], other=0.0)
    # in K's dtype: bf16/fp16 tensor-core MMA (the pooled query rounds to it)
    s = tl.dot(b_qbar.to(b_k.dtype), tl.trans(b_k)).to(tl.float32) * scale
    s = s - b_abar[:, None]  # [QB * GP, BLOCK_K]
    return tl.max(tl.reshape(s, [QB, GP, BLOCK_K]), axis=1)


@triton.jit
def _forced_mask(offs_k, diag, sink_blocks, local_blocks, BLOCK_N: tl.constexpr):
    """``[QB, BLOCK_K]``: keys in a sink block or in the query block's local window."""
    kb = offs_k // BLOCK_N
    return (kb[None, :] < sink_blocks) | (
        (kb[None, :] <= diag[:, None]) & (kb[None, :] > diag[:, None] - local_blocks))


@triton.jit
def _key_weight(diff, WEIGHTED: tl.constexpr, MAX_EXP: tl.constexpr):
    """A key's weight in the search: ``exp(diff)`` (clamped) for a mass budget, 1 for a count."""
    if WEIGHTED:
        return tl.exp(tl.minimum(diff, MAX_EXP))
    return tl.full(diff.shape, 1.0, tl.float32)


@triton.jit
def _forced_weight(k_base, lo, hi, limit, diag, sink_blocks, local_blocks, stride_ks, b_qbar,
                   b_abar, scale, offs_d, m_d, QB: tl.constexpr, GP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHTED: tl.constexpr,
                   MAX_EXP: tl.constexpr):
    """``[QB]``: the weight of the forced (sink and local) keys in ``[lo, hi)``, every key."""
    total = tl.zeros([QB], tl.float32)
    for start in range(lo, hi, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        diff = _group_diff(k_base, offs_k, hi, stride_ks, b_qbar, b_abar, scale, offs_d, m_d,
                           QB, GP, BLOCK_K)
        forced = _forced_mask(offs_k, diag, sink_blocks, local_blocks, BLOCK_N)
        keep = forced & (offs_k[None, :] < limit[:, None]) & (offs_k < hi)[None, :]
        total += tl.sum(tl.where(keep, _key_weight(diff, WEIGHTED, MAX_EXP), 0.0), axis=1)
    return total


@triton.jit
def _stripe_scan_kernel(
    QBAR, ABAR, K, THR, LOWS, MASS, COUNTS, INDICES, SPLIT_COUNTS,
    stride_kb, stride_kh, stride_ks,
    num_out_heads, num_q_heads, group, kv_group, seqlen_q, seqlen_k, num_k_blocks, sink_blocks,
    local_blocks, max_columns, scale, step, split_len,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GP: tl.constexpr, QB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NT: tl.constexpr,
    KEY_STRIDE: tl.constexpr, IS_CAUSAL: tl.constexpr, MODE: tl.constexpr,
    WEIGHTED: tl.constexpr, MAX_EXP: tl.constexpr, NSPLIT: tl.constexpr,
):
    # QB query blocks x GP heads of a group share every K tile: QB * GP pooled rows per dot;
    # program_id(2) takes the keys [split * split_len, (split + 1) * split_len) of NSPLIT
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(2)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_out_heads
    ho = pid_bh % num_out_heads
    hk = (ho * group) // kv_group  # ho itself per KV head; ho // kv_group per query head
    nqb = tl.cdiv(seqlen_q, BLOCK_M)
    offs_r = tl.arange(0, QB * GP)
    qb_r = pid_m * QB + offs_r // GP
    g_r = offs_r % GP
    m_r = (qb_r < nqb) & (g_r < group)
    offs_d = tl.arange(0, D_PAD)
    m_d = offs_d < HEAD_DIM
    row = (b * num_q_heads + ho * group + g_r) * nqb + qb_r
    b_qbar = tl.load(QBAR + row[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=m_r[:, None] & m_d[None, :], other=0.0)  # [QB * GP, D_PAD] fp32
    b_abar = tl.load(ABAR + row, mask=m_r, other=float("inf"))  # padded rows never win

    offs_qb = pid_m * QB + tl.arange(0, QB)
    m_qb = offs_qb < nqb
    offset = seqlen_k - seqlen_q
    last = tl.minimum(offs_qb * BLOCK_M + BLOCK_M - 1, seqlen_q - 1) + offset  # [QB]
    diag = tl.minimum(last // BLOCK_N, num_k_blocks - 1)
    if IS_CAUSAL:
        limit = tl.minimum(last + 1, seqlen_k)
    else:
        limit = tl.zeros([QB], tl.int32) + seqlen_k
    limit = tl.where(m_qb, limit, 0)
    k_lo = pid_s * split_len
    hi = tl.minimum(tl.max(limit, axis=0), k_lo + split_len)
    out_row = pid_bh * nqb + offs_qb  # [QB]
    split_row = out_row * NSPLIT + pid_s
    offs_t = tl.arange(0, NT)
    if MODE != 0:
        thr = tl.load(THR + out_row, mask=m_qb, other=float("inf"))
    else:
        low = tl.load(LOWS + out_row, mask=m_qb, other=0.0)
        thrs = low[:, None] + offs_t[None, :].to(tl.float32) * step  # [QB, NT]
    acc = tl.zeros([QB, NT], tl.float32)
    forced_total = tl.zeros([QB], tl.float32)
    cand_total = tl.zeros([QB], tl.float32)
    if MODE == 1 and NSPLIT > 1:  # this split's first slot (MODE=2 counted the splits)
        count = tl.load(SPLIT_COUNTS + split_row, mask=m_qb, other=0)
    else:
        count = tl.zeros([QB], tl.int32)
    k_base = K + b * stride_kb + hk * stride_kh
    if MODE == 0 and KEY_STRIDE > 1:
        # A strided sample estimates the candidates' weight (each sampled key stands for
        # KEY_STRIDE keys), but the forced keys are few and uneven (the sink key alone can
        # carry most of a row's weight, and it is always in the sample): sum them exactly,
        # once (the first split), over the sink blocks and the program's local windows.
        if pid_s == 0:
            hi_all = tl.max(limit, axis=0)
            sink_end = tl.minimum(sink_blocks * BLOCK_N, hi_all)
            forced_total += _forced_weight(
                k_base, 0, sink_end, limit, diag, sink_blocks, local_blocks, stride_ks, b_qbar,
                b_abar, scale, offs_d, m_d, QB, GP, BLOCK_N, BLOCK_K, WEIGHTED, MAX_EXP)
            d_lo = tl.min(tl.where(m_qb, diag, num_k_blocks), axis=0)
            d_hi = tl.max(tl.where(m_qb, diag, -1), axis=0)
            loc_lo = tl.maximum(tl.maximum(d_lo - local_blocks + 1, 0) * BLOCK_N, sink_end)
            loc_hi = tl.minimum((d_hi + 1) * BLOCK_N, hi_all)
            forced_total += _forced_weight(
                k_base, loc_lo, loc_hi, limit, diag, sink_blocks, local_blocks, stride_ks,
                b_qbar, b_abar, scale, offs_d, m_d, QB, GP, BLOCK_N, BLOCK_K, WEIGHTED,
                MAX_EXP)
    for start in range(k_lo, hi, BLOCK_K * KEY_STRIDE):
        offs_k = start + tl.arange(0, BLOCK_K) * KEY_STRIDE  # a strided sample when > 1
        diff = _group_diff(k_base, offs_k, hi, stride_ks, b_qbar, b_abar, scale, offs_d, m_d,
                           QB, GP, BLOCK_K)
        forced = _forced_mask(offs_k, diag, sink_blocks, local_blocks, BLOCK_N)
        valid = offs_k[None, :] < limit[:, None]
        cand = valid & ~forced  # [QB, BLOCK_K]
        if MODE == 0:
            w = _key_weight(diff, WEIGHTED, MAX_EXP)
            if KEY_STRIDE == 1:
                forced_total += tl.sum(tl.where(valid & forced, w, 0.0), axis=1)
            else:
                w = w * KEY_STRIDE  # a sampled candidate stands for KEY_STRIDE keys
            cand_total += tl.sum(tl.where(cand, w, 0.0), axis=1)
            # candidate weight at or above each of the NT thresholds
            above = (diff[:, :, None] >= thrs[:, None, :]) & cand[:, :, None]
            acc += tl.sum(tl.where(above, w[:, :, None], 0.0), axis=1)
        elif MODE == 2:  # count only
            count += tl.sum((cand & (diff >= thr[:, None])).to(tl.int32), axis=1)
        else:
            sel = cand & (diff >= thr[:, None])
            pos = count[:, None] + tl.cumsum(sel.to(tl.int32), axis=1) - 1
            cols = tl.zeros([QB, BLOCK_K], tl.int32) + offs_k[None, :]
            tl.store(INDICES + out_row[:, None] * max_columns + pos, cols,
                     mask=sel & (pos < max_columns) & m_qb[:, None])
            count += tl.sum(sel.to(tl.int32), axis=1)
    if MODE == 0:
        base = MASS + split_row * (NT + 2)
        tl.store(base[:, None] + offs_t[None, :], acc, mask=m_qb[:, None])
        tl.store(base + NT, forced_total, mask=m_qb)
        tl.store(base + NT + 1, cand_total, mask=m_qb)
    elif MODE == 2:
        tl.store(SPLIT_COUNTS + split_row, count, mask=m_qb)
    elif NSPLIT == 1:
        tl.store(COUNTS + out_row, tl.minimum(count, max_columns), mask=m_qb)


def search_stride(seqlen_k: int) -> int:
    """Key stride of the budget search: every ``CONFIG["long_stride"]``-th candidate beyond
    ``CONFIG["long_keys"]`` keys, else 1 (the torch path of ``anchor`` follows the same rule)."""
    return 1 if seqlen_k <= CONFIG["long_keys"] else int(CONFIG["long_stride"])


def _count_target(density, top_k, forced, nqb, block_m, sq, sk, causal):
    """Columns to add per query block (``forced``: the forced keys' exact count; a sampled
    search counts each sampled candidate as ``stride`` keys)."""
    if density is None:
        return torch.full_like(forced, float(top_k))
    last = (torch.arange(nqb, device=forced.device) * block_m + block_m - 1).clamp(
        max=sq - 1) + (sk - sq)
    reach = (last + 1).clamp(max=sk) if causal else torch.full_like(last, sk)
    return (density * reach.float()).round().clamp(min=1) - forced


def anchor_stripes(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int,
                   sink_blocks: int, local_blocks: int, causal: bool, theta: float | None,
                   mass: float | None, density: float | None, top_k: int | None,
                   max_columns: int, per_kv_head: bool, scale: float | None = None,
                   sample_stride: int | None = None):
    """Anchor estimation on the device: ``(col_counts [B, H, NQB], col_indices [B, H, NQB,
    max_columns])``, int32, ``-1`` padded; ``H = Hkv`` when ``per_kv_head`` else ``Hq``.

    Exactly one of ``theta``, ``mass``, ``density``, ``top_k``. A budget other than ``theta``
    becomes a per-block threshold through ``_SEARCH_LEVELS`` passes, each counting the
    candidates' weight above ``_NUM_THRESHOLDS`` thresholds (an NT-ary search of
    ``[_SEARCH_LOW, _SEARCH_LOW + _SEARCH_SPAN)``) over every ``sample_stride``-th key (default
    1 up to 16k keys, 8 beyond); then one pass selects. No host synchronisation.
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    nqb, nkb = triton.cdiv(sq, block_m), triton.cdiv(sk, block_n)
    d_pad = triton.next_power_of_2(dim)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    qbar = torch.empty(batch, hq, nqb, dim, device=q.device, dtype=torch.float32)
    abar = torch.empty(batch, hq, nqb, device=q.device, dtype=torch.float32)
    _anchor_pool_kernel[(nqb, batch * hq)](
        q, k, qbar, abar, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        hq, hq // hkv, sq, sk, nkb, sink_blocks, local_blocks, scale,
        HEAD_DIM=dim, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=causal,
        num_warps=4)
    group = hq // hkv if per_kv_head else 1
    heads = hkv if per_kv_head else hq
    gp = triton.next_power_of_2(group)
    # pooled rows per program (CONFIG): the selection pass reads each K tile once for
    # select_rows rows; the search passes use fewer, their [QB, BLOCK_K, NT] compare is larger
    rows = {0: CONFIG["search_rows"], 1: CONFIG["select_rows"]}
    rows[2] = rows[1]
    block_k = {0: CONFIG["search_block_k"], 1: CONFIG["select_block_k"],
               2: CONFIG["select_block_k"]}
    warps = {0: CONFIG["search_warps"], 1: CONFIG["select_warps"], 2: CONFIG["select_warps"]}
    splits = {0: CONFIG["search_splits"], 1: CONFIG["select_splits"],
              2: CONFIG["select_splits"]}
    counts = torch.empty(batch, heads, nqb, device=q.device, dtype=torch.int32)
    indices = torch.full((batch, heads, nqb, max_columns), -1, device=q.device,
                         dtype=torch.int32)
    stride = search_stride(sk) if sample_stride is None else sample_stride

    def scan(mode: int, thr=None, lows=None, sums=None, step=0.0, weighted=False,
             split_counts=None):
        dummy = abar
        qb = max(1, rows[mode] // gp)
        tile = block_k[mode] * (1 if mode else stride)
        # each split a whole number of (strided) tiles: the same keys as one program reads
        split_len = triton.cdiv(triton.cdiv(sk, splits[mode]), tile) * tile
        _stripe_scan_kernel[(triton.cdiv(nqb, qb), batch * heads, splits[mode])](
            qbar, abar, k, dummy if thr is None else thr, dummy if lows is None else lows,
            dummy if sums is None else sums, counts, indices,
            dummy if split_counts is None else split_counts,
            k.stride(0), k.stride(1), k.stride(2), heads, hq, group, hq // hkv, sq, sk, nkb,
            sink_blocks, local_blocks, max_columns, scale, step, split_len,
            HEAD_DIM=dim, D_PAD=d_pad, GP=gp, QB=qb, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k[mode], NT=_NUM_THRESHOLDS,
            KEY_STRIDE=1 if mode else stride, IS_CAUSAL=causal, MODE=mode,
            WEIGHTED=weighted, MAX_EXP=_MAX_EXP, NSPLIT=splits[mode], num_warps=warps[mode])

    if theta is not None:
        thr = torch.full((batch, heads, nqb), -float(theta), device=q.device)
    else:
        nt = _NUM_THRESHOLDS
        split_sums = torch.empty(batch, heads, nqb, splits[0], nt + 2, device=q.device)
        lows = torch.full((batch, heads, nqb), _SEARCH_LOW, device=q.device)
        step = _SEARCH_SPAN / nt
        target = below_all = None
        for _ in range(_SEARCH_LEVELS):
            scan(0, lows=lows, sums=split_sums, step=step, weighted=mass is not None)
            sums = split_sums.sum(-2)
            if target is None:
                forced, total = sums[..., nt], sums[..., nt + 1]
                target = (mass * (forced + total) - forced if mass is not None else
                          _count_target(density, top_k, forced, nqb, block_m, sq, sk, causal))
            # the highest threshold whose candidate weight above it still reaches the target
            idx = (sums[..., :nt] >= target[..., None]).sum(-1) - 1
            if below_all is None:  # even the lowest threshold misses: keep every candidate
                below_all = idx < 0
            lows = (lows + idx.clamp(min=0).float() * step).contiguous()
            step = step / nt
        thr = torch.where(below_all, float("-inf"), lows)
        thr = torch.where(target <= 0, float("inf"), thr)
    thr = thr.contiguous()
    if splits[1] > 1:  # count per split, then each split writes from its first slot
        per_split = torch.empty(batch, heads, nqb, splits[1], device=q.device,
                                dtype=torch.int32)
        scan(2, thr=thr, split_counts=per_split)
        total = per_split.sum(-1, dtype=torch.int32)
        counts.copy_(total.clamp(max=max_columns))
        scan(1, thr=thr, split_counts=(per_split.cumsum(-1, dtype=torch.int32)
                                       - per_split).contiguous())
    else:
        scan(1, thr=thr)
    return counts, indices
