"""Block-sparse attention forward (FlashAttention-2 style online softmax over listed key blocks).

One program computes a tile of BLOCK_M query rows against the key blocks its layout row lists.
With a per-KV-head layout and a power-of-two GQA group, the tile's rows are PACK query heads x
(BLOCK_M / PACK) tokens, so one K/V tile load serves the whole group (and short query chunks
still fill the tensor-core M dimension).

Softmax-threshold skipping (BLASST): a key tile whose scores sit, in every row, more than
log(lambda) below the running row max contributes < lambda per entry; we skip its exponentials,
its V load and its P.V product.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation


@triton.jit
def _load_kv_tile(base, start_n, seqlen_k, stride_n, stride_d,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows start_n.. of a K or V head: a tensor descriptor (the copy engine
    zero-fills rows past seqlen_k) or pointer loads masked at the edges."""
    if USE_TMA:
        tile = base.load([start_n.to(tl.int32), 0])
    else:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
        if MASKED:
            tile = tl.load(ptrs, mask=(offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM),
                           other=0.0)
        elif BLOCK_D != HEAD_DIM:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _threshold_skip(m_blk, m_i, log2_threshold):
    """BLASST: whether a key tile can be skipped: in every row its max score (log2 units)
    sits below the running max by more than -log2(threshold)."""
    # a row whose running max is -inf (nothing seen yet) gets gap=+inf: never skipped
    gap = tl.where(m_blk == float("-inf"), float("-inf"), m_blk - m_i)
    return tl.max(gap, 0) < log2_threshold


@triton.jit
def _softmax_step(s, m_i, l_i, acc, m_blk, qk_scale, MASKED: tl.constexpr):
    """Online-softmax update for raw scores ``s`` whose row max (scaled, log2 units) is
    ``m_blk``: ``(p, m_new, l_i, acc)`` with ``l_i`` and ``acc`` rescaled to the new max.
    (Lazy rescaling, moving the max only when it grows by more than 2**8, was 2-13% slower on
    an H100 for every kernel family: bench/RESULTS.md.)"""
    m_new = tl.maximum(m_i, m_blk)
    m_sub = m_new
    if MASKED:
        # a row that has seen no key keeps m = -inf and subtracts 0 instead (exp2 gives 0, not
        # NaN); storing that 0 as its max would make its later keys underflow when they score
        # below -126 (log2 units)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _gather_rows(base, pos, stride_n, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[len(pos), BLOCK_D] rows ``pos`` (all >= 0) of a K or V head, by pointer (cp.async on
    Hopper: its copy engine has no row gather)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + pos.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d
    if BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attend_tile(
    acc, l_i, m_i, n_skipped,
    b_q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start_n, row_pos, seqlen_k, qk_scale, log2_threshold,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_THRESHOLD: tl.constexpr,
    USE_TMA: tl.constexpr, GATHER: tl.constexpr = False,
):
    """One key tile of the online softmax. K_base/V_base: pointers, or tensor descriptors
    when USE_TMA. A skipped tile never loads V (loading V before the skip decision was
    measured slower on an H100: bench/RESULTS.md).

    With GATHER (stripe attention) ``start_n`` is instead a vector of key positions; their rows
    are gathered by pointer. MASKED: ``-1`` marks padding (reads row 0, masked) and causality
    is masked per position; unmasked, every position is valid and visible to every row."""
    if GATHER:
        safe = start_n
        if MASKED:
            valid = start_n >= 0
            safe = tl.where(valid, start_n, 0)
        b_k = _gather_rows(K_base, safe, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)
    else:
        b_k = _load_kv_tile(K_base, start_n, seqlen_k, stride_kn, stride_kd,
                            BLOCK_N, HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
    # [BLOCK_M, BLOCK_N] raw scores; the scale (with log2 e) is folded into the exp2's FMA
    s = tl.dot(b_q, tl.trans(b_k))
    if GATHER:
        if MASKED:
            visible = valid[None, :]
            if IS_CAUSAL:
                visible = visible & (start_n[None, :] <= row_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
    elif MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = offs_n[None, :] < seqlen_k
        if IS_CAUSAL:
            visible = visible & (offs_n[None, :] <= row_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_blk = tl.max(s, 1) * qk_scale
    skip = False
    if USE_THRESHOLD:
        skip = _threshold_skip(m_blk, m_i, log2_threshold)
    if skip:
        n_skipped += 1
    else:
        p, m_new, l_i, acc = _softmax_step(s, m_i, l_i, acc, m_blk, qk_scale, MASKED)
        if GATHER:
            # padding columns have p = 0 against the (finite) row 0 of V
            b_v = _gather_rows(V_base, safe, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
        else:
            b_v = _load_kv_tile(V_base, start_n, seqlen_k, stride_vn, stride_vd,
                                BLOCK_N, HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
        acc = tl.dot(p.to(b_v.dtype), b_v, acc)
        m_i = m_new
    return acc, l_i, m_i, n_skipped


@triton.jit
def _tile_coords(seqlen_q, seqlen_k, num_head_tiles, num_m_tiles,
                 GROUP: tl.constexpr, PACK: tl.constexpr, LAYOUT_PER_KV_HEAD: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Where this program's tile lies: ``(pid_bh, pid_m, b, h_kv, h_layout, t0, head, tok,
    row_pos, m_row)``; the rows of the tile are PACK query heads x BLOCK_M // PACK tokens."""
    # (batch, head tile) varies fastest and query tiles run last-first, so the first wave holds
    # every head's heaviest (under causality) tile: better tail balance. A 1-D grid has no
    # 65535 limit on the number of query tiles.
    pid = tl.program_id(0).to(tl.int64)
    num_bh = tl.num_programs(0).to(tl.int64) // num_m_tiles
    pid_bh = pid % num_bh
    pid_m = num_m_tiles - 1 - pid // num_bh
    b = pid_bh // num_head_tiles
    h0 = (pid_bh % num_head_tiles) * PACK  # first query head of the tile
    h_kv = h0 // GROUP
    h_layout = h_kv if LAYOUT_PER_KV_HEAD else h0
    TOKENS: tl.constexpr = BLOCK_M // PACK
    t0 = pid_m * TOKENS
    offs_r = tl.arange(0, BLOCK_M)
    head = h0 + offs_r // TOKENS
    tok = t0 + offs_r % TOKENS
    row_pos = tok + (seqlen_k - seqlen_q)  # queries are aligned to the end of the keys
    m_row = tok < seqlen_q
    return pid_bh, pid_m, b, h_kv, h_layout, t0, head, tok, row_pos, m_row


@triton.jit
def _load_q_kv(Q, K, V, b, head, tok, m_row, h_kv,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, seqlen_k,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """The query tile and the tile's K/V heads: ``(b_q, K_ptr, V_ptr, K_base, V_base, m_i,
    l_i, acc, n_skipped)``; ``*_base`` are tensor descriptors when USE_TMA (else the
    pointers), followed by the initial online-softmax state."""
    offs_d = tl.arange(0, BLOCK_D)
    p_q = (Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qm
           + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_row[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    K_ptr = K + b * stride_kb + h_kv * stride_kh
    V_ptr = V + b * stride_vb + h_kv * stride_vh
    K_base = K_ptr
    V_base = V_ptr
    if USE_TMA:
        K_base = tl.make_tensor_descriptor(K_ptr, shape=[seqlen_k, HEAD_DIM],
                                           strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
        V_base = tl.make_tensor_descriptor(V_ptr, shape=[seqlen_k, HEAD_DIM],
                                           strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_D])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_skipped = tl.zeros([], dtype=tl.int32)
    return b_q, K_ptr, V_ptr, K_base, V_base, m_i, l_i, acc, n_skipped


@triton.jit
def _attend_listed_blocks(
    acc, l_i, m_i, n_skipped, b_q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
    count, p_idx, stride_ij, t0, last_row, row_pos, seqlen_q, seqlen_k, qk_scale,
    log2_threshold, LAYOUT_BN: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, USE_THRESHOLD: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """The online softmax over the ``count`` sorted key blocks at ``p_idx``: unmasked tiles
    first (pipelined), then the masked suffix. Returns ``(acc, l_i, m_i, n_skipped,
    n_visited)``."""
    offset = seqlen_k - seqlen_q
    # A key block needs masking if some column passes the tile's first row (causal) or the
    # key length; indices are sorted, so those blocks are a suffix of the list.
    lim = seqlen_k - 1
    if IS_CAUSAL:
        lim = tl.minimum(lim, t0 + offset)
    first_masked = tl.maximum(lim + 1, 0) // LAYOUT_BN
    n_full = count
    scanning = n_full > 0
    while scanning:
        kb = tl.load(p_idx + (n_full - 1) * stride_ij)
        scanning = kb >= first_masked
        n_full -= scanning.to(tl.int32)
        scanning = scanning & (n_full > 0)
    N_SUB: tl.constexpr = LAYOUT_BN // BLOCK_N

    # one loop over (listed block, sub-tile) pairs: a single load site keeps the pipeline's
    # shared-memory buffers to one set
    for j in range(0, n_full * N_SUB):
        kb = tl.load(p_idx + (j // N_SUB) * stride_ij).to(tl.int64)
        acc, l_i, m_i, n_skipped = _attend_tile(
            acc, l_i, m_i, n_skipped, b_q, K_base, V_base,
            stride_kn, stride_kd, stride_vn, stride_vd,
            kb * LAYOUT_BN + (j % N_SUB) * BLOCK_N, row_pos, seqlen_k, qk_scale, log2_threshold,
            BLOCK_N, HEAD_DIM, BLOCK_D, False, IS_CAUSAL, USE_THRESHOLD, USE_TMA)
    n_visited = n_full * N_SUB
    # the masked suffix is a few tiles at most: not worth pipelining buffers
    for j in tl.range(n_full * N_SUB, count * N_SUB, num_stages=1):
        kb = tl.load(p_idx + (j // N_SUB) * stride_ij).to(tl.int64)
        start_n = kb * LAYOUT_BN + (j % N_SUB) * BLOCK_N
        in_reach = start_n < seqlen_k
        if IS_CAUSAL:
            # tiles wholly after the tile's last row see nothing
            in_reach = in_reach & (start_n <= last_row)
        if in_reach:
            acc, l_i, m_i, n_skipped = _attend_tile(
                acc, l_i, m_i, n_skipped, b_q, K_base, V_base,
                stride_kn, stride_kd, stride_vn, stride_vd,
                start_n, row_pos, seqlen_k, qk_scale, log2_threshold,
                BLOCK_N, HEAD_DIM, BLOCK_D, True, IS_CAUSAL, USE_THRESHOLD, USE_TMA)
            n_visited += 1
    return acc, l_i, m_i, n_skipped, n_visited


@triton.jit
def _store_tile(Out, Lse, Stats, acc, l_i, m_i, n_skipped, n_visited, b, head, tok, m_row,
                stat_slot, stride_ob, stride_oh, stride_om, stride_od, seqlen_q, num_q_heads,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RETURN_LSE: tl.constexpr,
                USE_THRESHOLD: tl.constexpr):
    """Normalise and store the tile (and its log-sum-exp, and its skipped/visited tile counts
    at ``Stats[stat_slot]``); rows that saw no key: l = 0, output 0, lse = -inf."""
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    p_o = (Out + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_om
           + offs_d[None, :] * stride_od)
    tl.store(p_o, out.to(Out.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    if RETURN_LSE:
        # Lse is contiguous [B, Hq, Sq]; m is in log2 units
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        p_lse = Lse + (b * num_q_heads + head) * seqlen_q + tok
        tl.store(p_lse, lse, mask=m_row)
    if USE_THRESHOLD:
        tl.store(Stats + stat_slot * 2, n_skipped)
        tl.store(Stats + stat_slot * 2 + 1, n_visited)


@triton.jit
def _attend_layout_blocks(
    Q, K, V, Counts, Indices,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ij,
    seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, qk_scale, log2_threshold,
    GROUP: tl.constexpr, PACK: tl.constexpr, LAYOUT_PER_KV_HEAD: tl.constexpr,
    LAYOUT_BM: tl.constexpr, LAYOUT_BN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_THRESHOLD: tl.constexpr, USE_TMA: tl.constexpr,
):
    """A program's tile, its Q load and the online softmax over the key blocks its layout
    lists: the whole block-sparse kernel but the store, and the first part of the stripe
    kernel. Returns the tile's coordinates, K/V pointers and softmax state."""
    pid_bh, pid_m, b, h_kv, h_layout, t0, head, tok, row_pos, m_row = _tile_coords(
        seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, GROUP, PACK, LAYOUT_PER_KV_HEAD,
        BLOCK_M)
    q_block = t0 // LAYOUT_BM
    b_q, K_ptr, V_ptr, K_base, V_base, m_i, l_i, acc, n_skipped = _load_q_kv(
        Q, K, V, b, head, tok, m_row, h_kv, stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, seqlen_k,
        BLOCK_M, BLOCK_N, HEAD_DIM, BLOCK_D, USE_TMA)
    count = tl.load(Counts + b * stride_cb + h_layout * stride_ch + q_block * stride_cm)
    p_idx = Indices + b * stride_ib + h_layout * stride_ih + q_block * stride_im
    last_row = tl.minimum(t0 + BLOCK_M // PACK, seqlen_q) - 1 + (seqlen_k - seqlen_q)
    acc, l_i, m_i, n_skipped, n_visited = _attend_listed_blocks(
        acc, l_i, m_i, n_skipped, b_q, K_base, V_base, stride_kn, stride_kd, stride_vn,
        stride_vd, count, p_idx, stride_ij, t0, last_row, row_pos, seqlen_q, seqlen_k,
        qk_scale, log2_threshold, LAYOUT_BN, BLOCK_N, HEAD_DIM, BLOCK_D, IS_CAUSAL,
        USE_THRESHOLD, USE_TMA)
    return (pid_bh, pid_m, b, h_layout, q_block, t0, head, tok, row_pos, m_row, last_row, b_q,
            K_ptr, V_ptr, acc, l_i, m_i, n_skipped, n_visited)


@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, Counts, Indices, Stats,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im, stride_ij,
    seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, qk_scale, log2_threshold,
    GROUP: tl.constexpr, PACK: tl.constexpr, LAYOUT_PER_KV_HEAD: tl.constexpr,
    LAYOUT_BM: tl.constexpr, LAYOUT_BN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, USE_THRESHOLD: tl.constexpr, RETURN_LSE: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    (pid_bh, pid_m, b, h_layout, q_block, t0, head, tok, row_pos, m_row, last_row, b_q, K_ptr,
     V_ptr, acc, l_i, m_i, n_skipped, n_visited) = _attend_layout_blocks(
        Q, K, V, Counts, Indices,
        stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd, stride_cb, stride_ch, stride_cm,
        stride_ib, stride_ih, stride_im, stride_ij,
        seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, qk_scale, log2_threshold,
        GROUP, PACK, LAYOUT_PER_KV_HEAD, LAYOUT_BM, LAYOUT_BN, BLOCK_M, BLOCK_N, HEAD_DIM,
        BLOCK_D, IS_CAUSAL, USE_THRESHOLD, USE_TMA)
    _store_tile(Out, Lse, Stats, acc, l_i, m_i, n_skipped, n_visited, b, head, tok, m_row,
                pid_bh * num_m_tiles + pid_m, stride_ob, stride_oh, stride_om, stride_od,
                seqlen_q, num_head_tiles * PACK, HEAD_DIM, BLOCK_D, RETURN_LSE, USE_THRESHOLD)


# Tile shapes per head dim: (rows of the query tile, key tile, warps, pipeline stages), from a
# sweep on an H100 (bf16, 32k, 32/8 heads, dense causal; bench/tune_block_sparse.py and
# bench/RESULTS.md). All use the copy engine (TMA) for K/V when the strides allow.
_HOPPER_CONFIGS = {
    64: (64, 128, 4, 2),
    128: (128, 64, 4, 2),
    256: (128, 64, 8, 2),
}


def default_config(head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and dtype."""
    padded = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return (64, 64, 4, 1)
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory; a correctness path, not a tuned one
        return (64, 64 if padded <= 128 else 32, 4, 2)
    key = min(_HOPPER_CONFIGS, key=lambda d: abs(d - padded))
    return _HOPPER_CONFIGS[key]


def _torch_workspace(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    # cached: the query costs ~10 us of host time on every launch otherwise
    return torch.cuda.get_device_capability(device_index)


def _can_use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Hopper's copy engine needs unit last stride, 16-byte aligned rows and bases, and a
    power-of-two head dim (the box is the whole row)."""
    if k.device.type != "cuda" or _capability(k.device.index or 0)[0] < 9:
        return False
    d = k.shape[-1]
    if d & (d - 1) or d < 16:
        return False
    elt = k.element_size()
    for t in (k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((st * elt) % 16 for st in t.stride()[:-1]):
            return False
    return True


def plan_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_heads: int,
                block_m: int, block_n: int, *, causal: bool, scale: float,
                softmax_threshold: float | None, return_lse: bool, pack_gqa: bool | None,
                config: tuple | None, use_tma: bool | None):
    """What the block-sparse and the stripe launchers share: output buffers, grid, the
    scalar arguments and the compile-time ones.

    Returns ``(out, lse, stats, grid, scalars, meta)``: ``lse``/``stats`` are None when not
    asked for, ``scalars`` = ``(seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, qk_scale,
    log2_threshold)``, ``meta`` the constexpr keyword arguments with warps and stages.
    """
    batch, hq, seqlen_q, head_dim = q.shape
    hkv, seqlen_k = k.shape[1], k.shape[2]
    group = hq // hkv
    layout_per_kv = layout_heads != hq
    tile_m, tile_n, num_warps, num_stages = config or default_config(head_dim, q.dtype, q.device)
    # pack the group's heads into the tile rows when they share a (per-KV-head) layout and G is
    # a power of two (tile shapes must be)
    can_pack = layout_per_kv and group > 1 and group & (group - 1) == 0
    pack = group if can_pack and pack_gqa is not False else 1
    # at least 16 rows per head so the tile stays a tensor-core shape; at most one layout block
    tile_m = max(tile_m, 16 * pack)
    tile_m = min(tile_m, block_m * pack)
    tile_n = min(tile_n, block_n)
    num_m_tiles = triton.cdiv(seqlen_q, tile_m // pack)
    num_head_tiles = hq // pack

    out = torch.empty((batch, hq, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    lse = (torch.empty((batch, hq, seqlen_q), dtype=torch.float32, device=q.device)
           if return_lse else None)
    use_threshold = softmax_threshold is not None and softmax_threshold > 0
    grid = (batch * num_head_tiles * num_m_tiles,)
    stats = (torch.zeros((grid[0], 2), dtype=torch.int32, device=q.device)
             if use_threshold else None)
    log2_threshold = math.log2(softmax_threshold) if use_threshold else float("-inf")
    if use_tma is None:
        use_tma = _can_use_tma(k, v)
    if use_tma and _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        # in-kernel tensor descriptors need a small global workspace
        triton.set_allocator(_torch_workspace)
    scalars = (seqlen_q, seqlen_k, num_head_tiles, num_m_tiles, scale * 1.4426950408889634,
               log2_threshold)
    meta = dict(
        GROUP=group, PACK=pack, LAYOUT_PER_KV_HEAD=layout_per_kv, LAYOUT_BM=block_m,
        LAYOUT_BN=block_n, BLOCK_M=tile_m, BLOCK_N=tile_n, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), IS_CAUSAL=causal,
        USE_THRESHOLD=use_threshold, RETURN_LSE=return_lse, USE_TMA=use_tma,
        num_warps=num_warps, num_stages=num_stages)
    return out, lse, stats, grid, scalars, meta


def block_sparse_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    counts: torch.Tensor, indices: torch.Tensor, block_m: int, block_n: int,
    *, causal: bool, scale: float, softmax_threshold: float | None,
    return_lse: bool, pack_gqa: bool | None = None, config: tuple | None = None,
    use_tma: bool | None = None,
):
    """Launch the kernel. Inputs are assumed validated (see sparse_attn.ops.block_sparse).

    Returns ``(out [B, Hq, Sq, D], lse [B, Hq, Sq] or None, stats [programs, 2] or None)``.
    """
    out, lse, stats, grid, scalars, meta = plan_launch(
        q, k, v, counts.shape[1], block_m, block_n, causal=causal, scale=scale,
        softmax_threshold=softmax_threshold, return_lse=return_lse, pack_gqa=pack_gqa,
        config=config, use_tma=use_tma)
    # out stands in for absent outputs; never written
    _block_sparse_fwd_kernel[grid](
        q, k, v, out, out if lse is None else lse, counts, indices,
        out if stats is None else stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *counts.stride(), *indices.stride(), *scalars, **meta)
    return out, lse, stats
