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

Speed (H100, 128k, d=128, 128-key blocks, 16 rows per 128-row query block; commit history has
the runs): the key tiles that lie before every row of the program run without any mask (only
the ~8 tiles at the diagonal are masked), the row max is taken on the unscaled tile so a score
costs one FMA before its exp2, int32 -> fp32 goes through the exact magic-number add instead of
the quarter-rate conversion, causal programs are launched longest first (heads on the fast grid
axis), and K tiles are triple-buffered (``num_stages=3``). Proxy (8 heads, bf16, two passes):
20.5 -> 11.8 ms; lowbit (32 heads, int8, window normaliser): 33.7 -> 20.4 ms.
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


# int32 -> fp32 without the quarter-rate conversion instruction: adding the bits of 1.5 * 2**23
# to an int32 |i| < 2**22 gives the float 1.5 * 2**23 + i exactly (an int8 dot of <= 256 dims
# stays below 127 * 127 * 256 < 2**22), and subtracting 1.5 * 2**23 is exact too
_MAGIC_BITS = tl.constexpr(0x4B400000)
_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _tile_raw(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_INT8: tl.constexpr,
              EVEN: tl.constexpr):
    """Unscaled fp32 scores of the row tile against keys start_n..: [BLOCK_M, BLOCK_N].
    EVEN: the whole key tile is in range."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    p_k = K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    if EVEN and BLOCK_D == HEAD_DIM:
        b_k = tl.load(p_k)
    else:
        b_k = tl.load(p_k, mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
                      other=0)
    if IS_INT8:
        acc = tl.dot(b_q, tl.trans(b_k), out_dtype=tl.int32)
        t = (acc + _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC
    else:
        t = tl.dot(b_q, tl.trans(b_k))
    return t


@triton.jit
def _tile_coef(KS_base, start_n, q_coef, BLOCK_N: tl.constexpr, IS_INT8: tl.constexpr):
    """Per-row coefficient (> 0) turning a raw tile into log2-scaled scores: t * c."""
    if IS_INT8:
        c = q_coef * tl.load(KS_base + start_n // BLOCK_N)
    else:
        c = q_coef
    return c


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
def _norm_step(m_i, l_i, b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_coef,
               KS_base, row_pos, sink_end, local_blocks, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_INT8: tl.constexpr,
               IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASKED: tl.constexpr):
    """Pass 1 on one key tile: the rows' running max and normaliser (log2 units). The max is
    taken on the raw tile (the coefficient is > 0), so a tile costs one max, one FMA, one exp2
    and one add per score."""
    t = _tile_raw(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, BLOCK_N, HEAD_DIM,
                  BLOCK_D, IS_INT8, not MASKED)
    c = _tile_coef(KS_base, start_n, q_coef, BLOCK_N, IS_INT8)
    if MASKED:
        m = _row_mask(start_n + tl.arange(0, BLOCK_N), row_pos, seqlen_k, sink_end,
                      local_blocks, IS_CAUSAL, WINDOW, BLOCK_N)
        t = tl.where(m, t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1) * c)
    # rows with nothing seen yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(t * c[:, None]
                                                                 - m_safe[:, None]), 1)
    return m_new, l_i


@triton.jit
def _mass_step(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_coef, KS_base,
               m_i, inv_l, row_pos, p_o, stride_on, out_ok, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_INT8: tl.constexpr,
               IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASKED: tl.constexpr,
               QBP: tl.constexpr, ROWS: tl.constexpr):
    """Pass 2 on one key tile: store each query block's mean sampled-row mass on it."""
    t = _tile_raw(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, BLOCK_N, HEAD_DIM,
                  BLOCK_D, IS_INT8, not MASKED)
    c = _tile_coef(KS_base, start_n, q_coef, BLOCK_N, IS_INT8)
    if MASKED:
        m = _row_mask(start_n + tl.arange(0, BLOCK_N), row_pos, seqlen_k, 0, 0, IS_CAUSAL,
                      False, BLOCK_N)
        t = tl.where(m, t, float("-inf"))
    x = t * c[:, None] - m_i[:, None]
    if WINDOW:
        # a window normaliser can sit below far scores: cap the exponent (no fp32 overflow)
        x = tl.minimum(x, 100.0)
    row_mass = tl.sum(tl.math.exp2(x), 1) * inv_l  # [BLOCK_M]
    blk_mass = tl.sum(tl.reshape(row_mass, (QBP, ROWS)), 1)  # [QBP]
    tl.store(p_o + (start_n // BLOCK_N) * stride_on, blk_mass, mask=out_ok)


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
    # heads on the fast grid axis; causal: the row tiles that see the most keys start first
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
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
    # scores in log2 units = raw * q_coef (* k_scale for int8); q_coef > 0
    if IS_INT8:
        q_coef = tl.load(QS + off_b * stride_qsb + off_h * stride_qsh + qb, mask=m_row,
                         other=1.0) * qk_scale
    else:
        q_coef = tl.zeros([BLOCK_M], dtype=tl.float32) + qk_scale
    K_base = K + off_b * stride_kb + off_hk * stride_kh
    KS_base = KS + off_b * stride_ksb + off_hk * stride_ksh

    hi = seqlen_k
    # key tiles below `full` need no mask: in range and (causal) before every row of the tile
    full = (seqlen_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, tl.max(tl.where(m_row, row_pos, 0), 0) + 1)
        first_pos = tl.min(tl.where(m_row, row_pos, seqlen_k), 0)
        full = tl.minimum(full, ((first_pos + 1) // BLOCK_N) * BLOCK_N)

    # pass 1: row max and normaliser (all reachable keys, or the sink + local window)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    sink_end = sink_blocks * BLOCK_N
    # two key ranges: [0, hi1) and [lo2, hi). Window: the sink tiles and the local tiles, all
    # masked (few); full softmax: the unmasked tiles and the masked ones at the diagonal
    hi1 = full
    lo2 = full
    if WINDOW:
        first = tl.min(tl.where(m_row, row_pos, seqlen_k), 0)
        hi1 = tl.minimum(sink_end, hi)
        lo2 = tl.maximum(tl.maximum(sink_end, (first // BLOCK_N - local_blocks + 1) * BLOCK_N), 0)
    for start_n in range(0, hi1, BLOCK_N):
        m_i, l_i = _norm_step(m_i, l_i, b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k,
                              q_coef, KS_base, row_pos, sink_end, local_blocks, BLOCK_N,
                              HEAD_DIM, BLOCK_D, IS_INT8, IS_CAUSAL, WINDOW, WINDOW)
    for start_n in range(lo2, hi, BLOCK_N):
        m_i, l_i = _norm_step(m_i, l_i, b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k,
                              q_coef, KS_base, row_pos, sink_end, local_blocks, BLOCK_N,
                              HEAD_DIM, BLOCK_D, IS_INT8, IS_CAUSAL, WINDOW, True)
    # rows that saw nothing (padding) contribute 0
    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0) / ROWS
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)

    # pass 2: per key block, the mean over sampled rows of its (relative) softmax mass
    out_qb = pid_m * QBP + tl.arange(0, QBP)
    out_ok = out_qb < nqb
    p_o = OUT + off_b * stride_ob + off_h * stride_oh + out_qb * stride_om
    for start_n in range(0, full, BLOCK_N):
        _mass_step(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_coef,
                   KS_base, m_i, inv_l, row_pos, p_o, stride_on, out_ok, BLOCK_N, HEAD_DIM,
                   BLOCK_D, IS_INT8, IS_CAUSAL, WINDOW, False, QBP, ROWS)
    for start_n in range(full, hi, BLOCK_N):
        _mass_step(b_q, K_base, stride_kn, stride_kd, start_n, seqlen_k, q_coef,
                   KS_base, m_i, inv_l, row_pos, p_o, stride_on, out_ok, BLOCK_N, HEAD_DIM,
                   BLOCK_D, IS_INT8, IS_CAUSAL, WINDOW, True, QBP, ROWS)


def block_scores(q_rows: torch.Tensor, k: torch.Tensor, row_pos: torch.Tensor, *, rows: int,
                 block_n: int, seqlen_q: int, causal: bool, scale: float,
                 q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 window: tuple[int, int] | None = None, rows_per_program: int = 128,
                 num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
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
    grid = (batch * hs, triton.cdiv(nqb, qbp))
    _block_scores_kernel[grid](
        q_rows, k, qs, ks, row_pos, out, *q_rows.stride(), *k.stride(),
        qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1), *out.stride(),
        hs, hs // hkv, nqb, seqlen_k, seqlen_k - seqlen_q, scale * _LOG2E, sink, local,
        ROWS=rows, QBP=qbp, BLOCK_N=block_n, HEAD_DIM=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), IS_CAUSAL=causal,
        WINDOW=window is not None, IS_INT8=is_int8,
        num_warps=num_warps or (4 if block_n <= 64 else 8), num_stages=num_stages)
    return out
