"""Block-level estimation kernels: per-block int8 quantization and sampled block scores.

``block_scores`` scores a few sampled query rows per query block against every reachable key,
token by token (the fine-grained estimate of ProxyAttn and SALE), and reduces the softmax-
normalised scores to one number per (query block, key block): the mean over the block's
sampled rows of the probability mass its keys get. Two passes over the keys: the first finds
each row's max and normaliser (over all reachable keys, or only over the sink and local key
blocks: SALE's relative attention score), the second recomputes the scores and sums
``exp(s - m) / l`` per key block. One program handles ``QBP`` query blocks x ``ROWS`` sampled
rows, so a K tile load serves ``BLOCK_M = QBP * ROWS`` rows (the tensor-core M dimension).
Inputs may be fp16/bf16/fp32, or int8 with per-row-group (query) and per-key-block scales:
the int8 dot accumulates in int32 and is rescaled in fp32.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _quantize_int8_kernel(
    X, Y, S, stride_xb, stride_xh, stride_xs, stride_xd,
    stride_yb, stride_yh, stride_ys, stride_sb, stride_sh,
    num_heads, seqlen,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program quantizes BLOCK rows of one (batch, head) to int8 with one absmax scale."""
    pid_blk = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    offs_s = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_x = (offs_s[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    p_x = (X + off_b * stride_xb + off_h * stride_xh + offs_s[:, None] * stride_xs
           + offs_d[None, :] * stride_xd)
    b_x = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK, BLOCK_D]
    amax = tl.max(tl.max(tl.abs(b_x), 1), 0)
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    b_y = b_x / scale
    # round half away from zero (tl has no round); |b_y| <= 127 by construction
    b_y = tl.where(b_y >= 0, tl.floor(b_y + 0.5), -tl.floor(-b_y + 0.5))
    p_y = Y + off_b * stride_yb + off_h * stride_yh + offs_s[:, None] * stride_ys + offs_d[None, :]
    tl.store(p_y, b_y.to(tl.int8), mask=m_x)
    tl.store(S + off_b * stride_sb + off_h * stride_sh + pid_blk, scale)


def quantize_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of ``x [B, H, S, D]`` with one scale per block of rows.

    Returns ``(xq int8 [B, H, S, D] contiguous, scale fp32 [B, H, ceil(S / block)])`` with
    ``x ~= xq * scale`` blockwise (an all-zero block gets scale 1).
    """
    batch, heads, seqlen, dim = x.shape
    nblk = triton.cdiv(seqlen, block)
    y = torch.empty(batch, heads, seqlen, dim, dtype=torch.int8, device=x.device)
    s = torch.empty(batch, heads, nblk, dtype=torch.float32, device=x.device)
    if nblk == 0 or batch * heads == 0:
        return y, s
    _quantize_int8_kernel[(nblk, batch * heads)](
        x, y, s, *x.stride(), y.stride(0), y.stride(1), y.stride(2), s.stride(0), s.stride(1),
        heads, seqlen, BLOCK=block, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
        num_warps=4)
    return y, s


@triton.jit
def _tile_scores(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_scale, KS_base,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 IS_INT8: tl.constexpr):
    """Scaled scores (log2 units) of the row tile against keys start_n..: [BLOCK_M, BLOCK_N]."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    p_k = K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    b_k = tl.load(p_k, mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
                  other=0)
    if IS_INT8:
        s = tl.dot(b_q, tl.trans(b_k), out_dtype=tl.int32).to(tl.float32)
        k_scale = tl.load(KS_base + start_n // BLOCK_N)
        s = s * (q_scale[:, None] * k_scale)
    else:
        s = tl.dot(b_q, tl.trans(b_k)) * q_scale[:, None]
    return s


@triton.jit
def _row_mask(offs_n, row_pos, seqlen_k, sink_end, local_lo, IS_CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys each row may use: in range, causal; with WINDOW only sink or local key blocks."""
    m = offs_n[None, :] < seqlen_k
    if IS_CAUSAL:
        m = m & (offs_n[None, :] <= row_pos[:, None])
    if WINDOW:
        # local key blocks of a row: the `local` blocks ending at its own key block
        row_lo = (row_pos // BLOCK_N - local_lo + 1) * BLOCK_N
        m = m & ((offs_n[None, :] < sink_end) | (offs_n[None, :] >= row_lo[:, None]))
    return m


@triton.jit
def _norm_step(m_i, l_i, b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_scale,
               KS_base, row_pos, sink_end, local_blocks, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_INT8: tl.constexpr,
               IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Pass 1 on one key tile: the rows' running max and normaliser (log2 units)."""
    s = _tile_scores(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_scale, KS_base,
                     BLOCK_N, HEAD_DIM, BLOCK_D, IS_INT8)
    m = _row_mask(start_n + tl.arange(0, BLOCK_N), row_pos, seqlen_k, sink_end, local_blocks,
                  IS_CAUSAL, WINDOW, BLOCK_N)
    s = tl.where(m, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with nothing seen yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
    return m_new, l_i


@triton.jit
def _block_scores_kernel(
    Q, K, QS, KS, POS, OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh,
    stride_ob, stride_oh, stride_om, stride_on,
    num_heads, group, nqb, seqlen_k, pos_offset, qk_scale, sink_blocks, local_blocks,
    ROWS: tl.constexpr, QBP: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    IS_INT8: tl.constexpr,
):
    BLOCK_M: tl.constexpr = QBP * ROWS
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group

    qb = pid_m * QBP + tl.arange(0, BLOCK_M) // ROWS  # query block of each row
    m_row = qb < nqb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # absolute position of each sampled row (queries end-aligned to the keys)
    row_pos = tl.load(POS + offs_m, mask=m_row, other=0) + pos_offset
    p_q = (Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
           + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_row[:, None] & (offs_d[None, :] < HEAD_DIM), other=0)
    if IS_INT8:
        q_scale = tl.load(QS + off_b * stride_qsb + off_h * stride_qsh + qb, mask=m_row,
                          other=0.0) * qk_scale
    else:
        q_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + qk_scale
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    KS_base = KS + off_b * stride_ksb + off_hk * stride_ksh

    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, tl.max(tl.where(m_row, row_pos, 0), 0) + 1)

    # pass 1: row max and normaliser (all reachable keys, or the sink + local window)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    sink_end = sink_blocks * BLOCK_N
    lo2 = 0
    if WINDOW:
        first_pos = tl.min(tl.where(m_row, row_pos, seqlen_k), 0)
        lo2 = tl.maximum(sink_end, (first_pos // BLOCK_N - local_blocks + 1) * BLOCK_N)
        lo2 = tl.maximum(lo2, 0)
        for start_n in range(0, tl.minimum(sink_end, hi), BLOCK_N):
            m_i, l_i = _norm_step(m_i, l_i, b_q, K_base, stride_kn, stride_kd, start_n,
                                  seqlen_k, q_scale, KS_base, row_pos, sink_end, local_blocks,
                                  BLOCK_N, HEAD_DIM, BLOCK_D, IS_INT8, IS_CAUSAL, WINDOW)
    for start_n in range(lo2, hi, BLOCK_N):
        m_i, l_i = _norm_step(m_i, l_i, b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k,
                              q_scale, KS_base, row_pos, sink_end, local_blocks, BLOCK_N,
                              HEAD_DIM, BLOCK_D, IS_INT8, IS_CAUSAL, WINDOW)
    # rows that saw nothing (padding) contribute 0
    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0) / ROWS
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)

    # pass 2: per key block, the mean over sampled rows of its (relative) softmax mass
    out_qb = pid_m * QBP + tl.arange(0, QBP)
    p_o = OUT + off_b * stride_ob + off_h * stride_oh + out_qb * stride_om
    for start_n in range(0, hi, BLOCK_N):
        s = _tile_scores(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_scale,
                         KS_base, BLOCK_N, HEAD_DIM, BLOCK_D, IS_INT8)
        m = _row_mask(start_n + tl.arange(0, BLOCK_N), row_pos, seqlen_k, 0, 0, IS_CAUSAL,
                      False, BLOCK_N)
        # a window normaliser can sit below far scores: cap the exponent (no fp32 overflow)
        p = tl.math.exp2(tl.minimum(tl.where(m, s, float("-inf")) - m_i[:, None], 100.0))
        row_mass = tl.sum(p, 1) * inv_l  # [BLOCK_M]
        blk_mass = tl.sum(tl.reshape(row_mass, (QBP, ROWS)), 1)  # [QBP]
        tl.store(p_o + (start_n // BLOCK_N) * stride_on, blk_mass, mask=out_qb < nqb)


def block_scores(q_rows: torch.Tensor, k: torch.Tensor, row_pos: torch.Tensor, *, rows: int,
                 block_n: int, seqlen_q: int, causal: bool, scale: float,
                 q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 window: tuple[int, int] | None = None, rows_per_program: int = 128
                 ) -> torch.Tensor:
    """Mean sampled-row softmax mass per (query block, key block); see the module docstring.

    Args:
        q_rows: ``[B, Hs, NQB * rows, D]``: ``rows`` sampled rows per query block (float, or
            int8 with ``q_scale [B, Hs, NQB]``); scored head ``h`` reads K head ``h // (Hs //
            Hkv)``.
        k: ``[B, Hkv, Sk, D]`` (int8 with ``k_scale [B, Hkv, ceil(Sk / block_n)]``).
        row_pos: int32 ``[NQB * rows]``: each sampled row's position in the query sequence.
        window: ``(sink_blocks, local_blocks)`` for a sink + local normaliser, or None for the
            full softmax over the reachable keys.

    Returns:
        fp32 ``[B, Hs, NQB, ceil(Sk / block_n)]`` (0 on unreachable blocks).
    """
    batch, hs, nrows, dim = q_rows.shape
    hkv, seqlen_k = k.shape[1], k.shape[2]
    nqb = nrows // rows
    nkb = triton.cdiv(seqlen_k, block_n)
    out = torch.zeros(batch, hs, nqb, nkb, dtype=torch.float32, device=q_rows.device)
    if out.numel() == 0:
        return out
    is_int8 = q_rows.dtype == torch.int8
    if is_int8 and (q_scale is None or k_scale is None):
        raise ValueError("block_scores: int8 inputs need q_scale and k_scale")
    qs = q_scale if is_int8 else out  # unused pointer when not int8
    ks = k_scale if is_int8 else out
    qbp = max(1, rows_per_program // rows)
    sink, local = window if window is not None else (0, 0)
    grid = (triton.cdiv(nqb, qbp), batch * hs)
    _block_scores_kernel[grid](
        q_rows, k, qs, ks, row_pos, out, *q_rows.stride(), *k.stride(),
        qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1), *out.stride(),
        hs, hs // hkv, nqb, seqlen_k, seqlen_k - seqlen_q, scale * _LOG2E, sink, local,
        ROWS=rows, QBP=qbp, BLOCK_N=block_n, HEAD_DIM=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), IS_CAUSAL=causal,
        WINDOW=window is not None, IS_INT8=is_int8, num_warps=4 if block_n <= 64 else 8,
        num_stages=2)
    return out
