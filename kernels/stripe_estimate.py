"""Triton estimation kernels of the stripe estimators (``anchor``).

Two kernels, both one program per (query block, batch x head):

- ``_anchor_pool_kernel``: mean-pools the query block and takes every row's maximum scaled score
  over its dense keys (sink blocks + local window, causally masked): the block anchor is the mean
  of those row maxima. Reads only the block's Q tile and its few dense K tiles.
- ``_stripe_scan_kernel``: scores the pooled queries of a group (all query heads of one KV head,
  or one head) against every reachable key, takes the group's maximum of ``score - anchor`` per
  key, and either (``MODE=0``) accumulates a histogram of those differences over the candidate
  columns (weighted by ``exp(diff)`` for a mass budget, by 1 for a count budget; the dense keys'
  total in the last slot), or (``MODE=1``) keeps the candidates with ``diff >= threshold`` and
  writes their positions compacted, in increasing order, with a running count.

A budget other than ``theta`` becomes a per-block threshold from the histogram in torch (cumulative
sums, no host synchronisation): the lower edge of the bin where the budget is reached, so the kept
set covers the budget and overshoots it by at most one bin (``_BIN_WIDTH`` in logits).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_BIN_LOW = -24.0  # differences below this share the lowest bin (weight e**-24: nothing)
_BIN_WIDTH = 0.25
_NUM_BINS = 128  # covers [-24, 8); larger differences share the top bin
_MAX_EXP = 30.0  # exp(diff) is clamped here (a pooled score far above its anchor)


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
def _stripe_scan_kernel(
    QBAR, ABAR, K, THR, LOWS, HIST, COUNTS, INDICES,
    stride_kb, stride_kh, stride_ks,
    num_out_heads, num_q_heads, group, kv_group, seqlen_q, seqlen_k, num_k_blocks, sink_blocks,
    local_blocks, max_columns, scale, bin_width,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_BINS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MODE: tl.constexpr, WEIGHTED: tl.constexpr, MAX_EXP: tl.constexpr,
    REFINE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_out_heads
    ho = pid_bh % num_out_heads
    # query heads of this output head: the whole group (per KV head) or one head
    hk = (ho * group) // kv_group  # ho itself per KV head; ho // kv_group per query head
    nqb = tl.cdiv(seqlen_q, BLOCK_M)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    m_g = offs_g < group
    m_d = offs_d < HEAD_DIM
    hq = ho * group + offs_g  # [G_PAD]
    row = (b * num_q_heads + hq) * nqb + pid_m
    b_qbar = tl.load(QBAR + row[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=m_g[:, None] & m_d[None, :], other=0.0)  # [G_PAD, D_PAD] fp32
    b_abar = tl.load(ABAR + row, mask=m_g, other=float("inf"))  # padded heads never win

    offset = seqlen_k - seqlen_q
    last = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, seqlen_q - 1) + offset
    diag = tl.minimum(last // BLOCK_N, num_k_blocks - 1)
    if IS_CAUSAL:
        limit = tl.minimum(last + 1, seqlen_k)
    else:
        limit = seqlen_k
    out_row = pid_bh * nqb + pid_m
    if MODE == 1:
        thr = tl.load(THR + out_row)
    else:
        bin_low = tl.load(LOWS + out_row)
    count = tl.zeros([], tl.int32)
    forced_total = tl.zeros([], tl.float32)
    hist = tl.zeros([NUM_BINS], tl.float32)
    offs_bin = tl.arange(0, NUM_BINS)
    k_base = K + b * stride_kb + hk * stride_kh
    for start in range(0, limit, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        valid = offs_k < limit
        b_k = tl.load(k_base + offs_k[:, None] * stride_ks + offs_d[None, :],
                      mask=valid[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        s = tl.dot(b_qbar, tl.trans(b_k)) * scale  # [G_PAD, BLOCK_K]
        diff = tl.max(s - b_abar[:, None], axis=0)  # [BLOCK_K]
        kb = offs_k // BLOCK_N
        forced = (kb < sink_blocks) | ((kb <= diag) & (kb > diag - local_blocks))
        cand = valid & ~forced
        if MODE == 0:
            if WEIGHTED:
                w = tl.exp(tl.minimum(diff, MAX_EXP))
            else:
                w = tl.full([BLOCK_K], 1.0, tl.float32)
            forced_total += tl.sum(tl.where(valid & forced, w, 0.0), axis=0)
            bins = tl.floor((diff - bin_low) / bin_width).to(tl.int32)
            bins = tl.minimum(tl.maximum(bins, 0), NUM_BINS - 1)
            hist_cand = cand
            if REFINE:  # a second pass resolves one coarse bin: differences below it are out
                hist_cand = cand & (diff >= bin_low)
            hit = (bins[:, None] == offs_bin[None, :]) & hist_cand[:, None]  # [BLOCK_K, NUM_BINS]
            hist += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
        else:
            sel = cand & (diff >= thr)
            pos = count + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            tl.store(INDICES + out_row * max_columns + pos, offs_k.to(tl.int32),
                     mask=sel & (pos < max_columns))
            count += tl.sum(sel.to(tl.int32), axis=0)
    if MODE == 0:
        tl.store(HIST + out_row * (NUM_BINS + 1) + offs_bin, hist)
        tl.store(HIST + out_row * (NUM_BINS + 1) + NUM_BINS, forced_total)
    else:
        tl.store(COUNTS + out_row, tl.minimum(count, max_columns))


def _threshold_from_hist(hist: torch.Tensor, target: torch.Tensor, low, width: float
                         ) -> torch.Tensor:
    """Per-row threshold: the lower edge of the highest bin where the top-down cumulative
    weight reaches ``target`` (``+inf`` when nothing is needed, ``-inf``: every candidate)."""
    bins = hist[..., :_NUM_BINS]
    from_top = bins.flip(-1).cumsum(-1).flip(-1)  # weight in bins >= i
    idx = (from_top >= target[..., None]).sum(-1) - 1  # the highest bin reaching it
    edge = low + idx.float() * width
    edge = torch.where(idx <= 0, float("-inf"), edge)
    return torch.where(target <= 0, float("inf"), edge)


def anchor_stripes(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int,
                   sink_blocks: int, local_blocks: int, causal: bool, theta: float | None,
                   mass: float | None, density: float | None, top_k: int | None,
                   max_columns: int, per_kv_head: bool, scale: float | None = None):
    """Anchor estimation on the device: ``(col_counts [B, H, NQB], col_indices [B, H, NQB,
    max_columns])``, int32, ``-1`` padded; ``H = Hkv`` when ``per_kv_head`` else ``Hq``.

    Exactly one of ``theta``, ``mass``, ``density``, ``top_k``. No host synchronisation.
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
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    counts = torch.empty(batch, heads, nqb, device=q.device, dtype=torch.int32)
    indices = torch.full((batch, heads, nqb, max_columns), -1, device=q.device,
                         dtype=torch.int32)

    def scan(mode: int, thr=None, lows=None, hist=None, weighted=False, width=_BIN_WIDTH,
             refine=False):
        dummy = abar
        _stripe_scan_kernel[(nqb, batch * heads)](
            qbar, abar, k, dummy if thr is None else thr, dummy if lows is None else lows,
            dummy if hist is None else hist, counts, indices, k.stride(0), k.stride(1),
            k.stride(2), heads, hq, group, hq // hkv, sq, sk, nkb, sink_blocks, local_blocks,
            max_columns, scale, width,
            HEAD_DIM=dim, D_PAD=d_pad, G_PAD=g_pad, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=64, NUM_BINS=_NUM_BINS, IS_CAUSAL=causal, MODE=mode, WEIGHTED=weighted,
            MAX_EXP=_MAX_EXP, REFINE=refine, num_warps=4)

    if theta is not None:
        thr = torch.full((batch, heads, nqb), -float(theta), device=q.device)
    else:
        hist = torch.empty(batch, heads, nqb, _NUM_BINS + 1, device=q.device,
                           dtype=torch.float32)
        weighted = mass is not None
        scan(0, lows=torch.full((batch, heads, nqb), _BIN_LOW, device=q.device), hist=hist,
             weighted=weighted)
        forced = hist[..., _NUM_BINS]
        if mass is not None:
            target = mass * (forced + hist[..., :_NUM_BINS].sum(-1)) - forced
        elif density is not None:
            last = (torch.arange(nqb, device=q.device) * block_m + block_m - 1).clamp(
                max=sq - 1) + (sk - sq)
            reach = (last + 1).clamp(max=sk) if causal else torch.full_like(last, sk)
            target = (density * reach.float()).round().clamp(min=1) - forced
        else:
            target = torch.full_like(forced, float(top_k))
        coarse = _threshold_from_hist(hist, target, _BIN_LOW, _BIN_WIDTH)
        # second pass: the coarse bin split into NUM_BINS finer ones
        lows = torch.where(torch.isfinite(coarse), coarse, _BIN_LOW).contiguous()
        fine_width = _BIN_WIDTH / _NUM_BINS
        scan(0, lows=lows, hist=hist, weighted=weighted, width=fine_width, refine=True)
        fine = _threshold_from_hist(hist, target, lows, fine_width)
        thr = torch.where(torch.isfinite(coarse) & torch.isfinite(fine), fine, coarse)
    scan(1, thr=thr.contiguous())
    return counts, indices
