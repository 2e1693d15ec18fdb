"""Stripe attention forward: the dense key blocks of a StripeLayout, then its stripes.

One program computes a tile of BLOCK_M query rows (PACK query heads x BLOCK_M / PACK tokens
with a per-KV-head layout and a power-of-two GQA group, as in the block-sparse kernel):

1. the layout's dense key blocks (sink, local window, slashes) with the block-sparse kernel's
   own loop (``_attend_listed_blocks``: TMA or pointer tiles, unmasked tiles pipelined);
2. the stripes: BLOCK_NS key positions at a time are read from the sorted column list and their
   K and V rows gathered by pointer (Hopper's copy engine has no row gather; cp.async does it,
   one 16-byte vector per thread, into shared memory, where both wgmma products read them).
   The tile's rows share the gathered [BLOCK_NS, D] K/V tile, so GQA packing serves a whole
   group from one gather. Full tiles wholly in the tile's past (a prefix: positions are
   sorted) run unmasked, with the next tile's positions loaded one iteration ahead so that
   COL_STAGES - 1 gathered tiles are in flight; the rest (padding -1, read as position 0 and
   masked; positions past some row) is a short masked tail, causality masked per position.

BLASST (``softmax_threshold``) skips gathered tiles too (V gather and P.V included).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse import _attend_layout_blocks, _attend_tile, _store_tile, plan_launch


@triton.jit
def _stripe_fwd_kernel(
    Q, K, V, Out, Lse, Counts, Indices, ColCounts, ColIndices, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ij,
    stride_sb, stride_sh, stride_sm,
    stride_xb, stride_xh, stride_xm, stride_cj,
    seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, qk_scale, log2_threshold,
    GROUP: tl.constexpr, PACK: tl.constexpr, LAYOUT_PER_KV_HEAD: tl.constexpr,
    LAYOUT_BM: tl.constexpr, LAYOUT_BN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, COL_STAGES: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_THRESHOLD: tl.constexpr, RETURN_LSE: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    # 1. dense key blocks: the block-sparse kernel's loop
    (pid_bh, pid_m, b, h_layout, q_block, t0, head, tok, row_pos, m_row, last_row, b_q, K_ptr,
     V_ptr, acc, l_i, m_i, n_skipped, n_visited) = _attend_layout_blocks(
        Q, K, V, Counts, Indices,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_cb, stride_ch, stride_cm,
        stride_ib, stride_ih, stride_im, stride_ij,
        seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, qk_scale, log2_threshold,
        GROUP, PACK, LAYOUT_PER_KV_HEAD, LAYOUT_BM, LAYOUT_BN, BLOCK_M, BLOCK_N, HEAD_DIM,
        BLOCK_D, IS_CAUSAL, USE_THRESHOLD, USE_TMA)

    # 2. stripes, BLOCK_NS gathered positions at a time
    col_count = tl.load(ColCounts + b * stride_sb + h_layout * stride_sh + q_block * stride_sm)
    p_col = ColIndices + b * stride_xb + h_layout * stride_xh + q_block * stride_xm
    offs_c = tl.arange(0, BLOCK_NS)
    n_tiles = tl.cdiv(col_count, BLOCK_NS)
    # Full tiles whose positions all lie at or before the tile's first row need no mask (no
    # padding, every row sees every position); positions are sorted, so they are a prefix of
    # the list: the masked tail is found scanning back from the end.
    n_full = col_count // BLOCK_NS
    if IS_CAUSAL:
        first_row = t0 + (seqlen_k - seqlen_q)
        scanning = n_full > 0
        while scanning:
            last = tl.load(p_col + (n_full * BLOCK_NS - 1) * stride_cj)
            scanning = last > first_row
            n_full -= scanning.to(tl.int32)
            scanning = scanning & (n_full > 0)
    # Each tile's positions are loaded one iteration ahead, so the K/V row addresses never
    # wait on a load of the same iteration: the software pipeline (COL_STAGES) then keeps
    # COL_STAGES - 1 gathered tiles in flight (the positions of a tile loaded in the same
    # iteration as its rows gave one, whatever COL_STAGES).
    pos = tl.load(p_col + offs_c * stride_cj, mask=offs_c < col_count, other=0)
    for j in tl.range(0, n_full, num_stages=COL_STAGES):
        nxt = (j + 1) * BLOCK_NS + offs_c
        pos_next = tl.load(p_col + nxt * stride_cj, mask=nxt < col_count, other=0)
        acc, l_i, m_i, n_skipped = _attend_tile(
            acc, l_i, m_i, n_skipped, b_q, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn,
            stride_vd, pos, row_pos, seqlen_k, qk_scale, log2_threshold, BLOCK_NS, HEAD_DIM,
            BLOCK_D, False, IS_CAUSAL, USE_THRESHOLD, False, True)
        pos = pos_next
    n_visited += n_full
    # the masked tail: padding, and positions past some row of the tile (a few tiles)
    for j in tl.range(n_full, n_tiles, num_stages=1):
        in_reach = True
        if IS_CAUSAL:
            # tiles wholly after the tile's last row see nothing
            in_reach = tl.load(p_col + j * BLOCK_NS * stride_cj) <= last_row
        if in_reach:
            slot = j * BLOCK_NS + offs_c
            pos = tl.load(p_col + slot * stride_cj, mask=slot < col_count, other=-1)
            acc, l_i, m_i, n_skipped = _attend_tile(
                acc, l_i, m_i, n_skipped, b_q, K_ptr, V_ptr, stride_kn, stride_kd,
                stride_vn, stride_vd, pos, row_pos, seqlen_k, qk_scale, log2_threshold,
                BLOCK_NS, HEAD_DIM, BLOCK_D, True, IS_CAUSAL, USE_THRESHOLD, False, True)
            n_visited += 1

    _store_tile(Out, Lse, Stats, acc, l_i, m_i, n_skipped, n_visited, b, head, tok, m_row,
                pid_bh * num_m_tiles + pid_m, stride_ob, stride_oh, stride_om, stride_od,
                seqlen_q, num_head_tiles * PACK, HEAD_DIM, BLOCK_D, RETURN_LSE, USE_THRESHOLD)


# Per padded head dim: (BLOCK_M rows, BLOCK_N dense key tile, BLOCK_NS gathered positions,
# warps, dense pipeline stages, gather pipeline stages). sm_90 AOT compiles (bf16, GQA 4 packed,
# 64 x 64 layout tiles, TMA for the dense part; shared memory, registers, spills):
#   d=64:  56 KB, 137 registers, no spills
#   d=128: 128 KB, 190 registers, no spills; 3 gather buffers, 2 tiles in flight
#   d=256: 160 KB, 237 registers, no spills
# d=128 from an H100 sweep (bench/bench_stripe.py --tune-only, 128k, 32/8 heads, N = 1024 /
# 4096 / 16384 gathered positions per query block; stripe ms / block-sparse ms at equal pairs):
#   128/64/64/8/2/3   1.19 / 1.11 / 1.29   (chosen)
#   128/64/64/8/2/4   1.28 / 1.14 / 1.27
#   128/64/128/8/2/3  1.18 / 1.15 / 1.35   (224 KB shared)
#   64/64/64/4/2/3    1.22 / 1.21 / 1.61   (2 programs per SM; twice the gathered bytes)
#   128/64/32/4/2/4   1.20 / 1.24 / 1.58   (2 programs per SM; spills 120 B)
#   128/64/32/8/2/5   1.40 / 1.41 / 1.54
# d=64 and d=256 follow the same reasoning (gather stages 3: two tiles in flight), not timed.
_HOPPER_CONFIGS = {
    64: (64, 64, 64, 4, 2, 3),
    128: (128, 64, 64, 8, 2, 3),
    256: (128, 32, 32, 8, 2, 3),
}


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_NS, num_warps, num_stages, col_stages) for a head dim/dtype."""
    padded = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return (64, 64, 32, 4, 1, 1)
    if dtype == torch.float32:
        return (64, 64 if padded <= 128 else 32, 32, 4, 2, 1)
    key = min(_HOPPER_CONFIGS, key=lambda d: abs(d - padded))
    return _HOPPER_CONFIGS[key]


def stripe_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, causal: bool,
               scale: float, softmax_threshold: float | None, return_lse: bool,
               pack_gqa: bool | None = None, config: tuple | None = None,
               use_tma: bool | None = None):
    """Launch the kernel. Inputs are assumed validated (see sparse_attn.ops.stripe).

    ``config``: ``(BLOCK_M, BLOCK_N, BLOCK_NS, num_warps, num_stages, col_stages)``.
    Returns ``(out [B, Hq, Sq, D], lse [B, Hq, Sq] or None, stats [programs, 2] or None)``.
    """
    tile_m, tile_n, tile_ns, warps, stages, col_stages = (
        config or default_config(q.shape[3], q.dtype, q.device))
    blocks = layout.blocks
    out, lse, stats, grid, scalars, meta = plan_launch(
        q, k, v, layout.num_heads, blocks.block_m, blocks.block_n, causal=causal, scale=scale,
        softmax_threshold=softmax_threshold, return_lse=return_lse, pack_gqa=pack_gqa,
        config=(tile_m, tile_n, warps, stages), use_tma=use_tma)
    # out stands in for absent outputs; never written
    _stripe_fwd_kernel[grid](
        q, k, v, out, out if lse is None else lse, blocks.counts, blocks.indices,
        layout.col_counts, layout.col_indices, out if stats is None else stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *blocks.counts.stride(), *blocks.indices.stride(),
        *layout.col_counts.stride(), *layout.col_indices.stride(), *scalars,
        BLOCK_NS=tile_ns, COL_STAGES=col_stages, **meta)
    return out, lse, stats
