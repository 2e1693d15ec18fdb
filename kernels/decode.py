"""Decode attention (flash-decoding): few query tokens against a long KV cache.

The key length is split across programs: each (batch, KV head, head tile, split) program runs
the online softmax over its slice of keys and writes a partial ``(out, lse)``; a second kernel
combines the splits of every query row. The number of splits comes from the shapes and the SM
count only (never from cache lengths held on the device), so a step captures in a CUDA graph.

Tile rows: the query heads of a KV group x the Sq query tokens (``row = head * SQ + token``),
padded to 16 so the products are tensor-core shapes; one K/V tile load serves the whole group.

Keys are addressed through a "stream" of positions per (batch, KV head): the cache positions
``0..seqlen-1`` (dense), or the blocks of ``block_indices`` one after another (sparse, Quest-like
top-k pages). Each tile of BLOCK_N stream positions maps to cache rows (through the block table
for a paged cache) and is gathered row by row: a row is ``HEAD_DIM`` contiguous elements, so
loads stay fully coalesced whatever the page size.

Softmax-threshold skipping (BLASST) as in ``block_sparse``: a key tile whose scores all sit more
than ``log(threshold)`` below the running row max skips its exponentials, V load and P.V.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .block_sparse import _softmax_step, _threshold_skip


@triton.jit
def _decode_split_kernel(
    Q, K, V, OutPart, LsePart, Out, Lse, Seqlens, BlockTable, Indices,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tb, stride_tp,
    stride_ib, stride_ih, stride_ij,
    num_kv_heads, capacity, nsel, per_split, qk_scale, log2_threshold,
    SQ: tl.constexpr, GROUP: tl.constexpr, HEADS_PER_TILE: tl.constexpr,
    NUM_HEAD_TILES: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_IN_BLOCK: tl.constexpr, PAGED: tl.constexpr,
    SPARSE: tl.constexpr, HAS_SEQLENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_THRESHOLD: tl.constexpr, RETURN_LSE: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # splits vary fastest: the programs of one head read neighbouring slices of its cache
    pid = tl.program_id(0).to(tl.int64)
    split = pid % NUM_SPLITS
    rest = pid // NUM_SPLITS
    h_tile = rest % NUM_HEAD_TILES
    rest = rest // NUM_HEAD_TILES
    h_kv = rest % num_kv_heads
    b = rest // num_kv_heads

    # [BLOCK_M] rows: (query head of the group, query token)
    offs_r = tl.arange(0, BLOCK_M)
    h_loc = h_tile * HEADS_PER_TILE + offs_r // SQ
    tok = offs_r % SQ
    m_row = (offs_r < HEADS_PER_TILE * SQ) & (h_loc < GROUP)
    head = h_kv * GROUP + h_loc
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM

    if HAS_SEQLENS:
        seqlen = tl.load(Seqlens + b).to(tl.int64)
    else:
        seqlen = capacity.to(tl.int64)
    q_pos = seqlen - SQ + tok  # absolute position of each row's query
    if SPARSE:
        stream_len = nsel.to(tl.int64) * BLOCK_SIZE
    else:
        stream_len = seqlen
    start = split * per_split
    end = tl.minimum(start + per_split, stream_len)

    p_q = (Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qm
           + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)
    if PAGED:
        K_base = K + h_kv * stride_kh
        V_base = V + h_kv * stride_vh
    else:
        K_base = K + b * stride_kb + h_kv * stride_kh
        V_base = V + b * stride_vb + h_kv * stride_vh
    p_idx = Indices + b * stride_ib + h_kv * stride_ih
    p_tab = BlockTable + b * stride_tb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for p0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        pos = p0 + offs_n
        valid = pos < end
        # TILE_IN_BLOCK: the tile lies inside one block/page, so one index and one page number
        # serve it (scalars); otherwise (blocks smaller than the tile) each row looks up its own
        if SPARSE:
            if TILE_IN_BLOCK:
                blk = tl.load(p_idx + (p0 // BLOCK_SIZE) * stride_ij).to(tl.int64)
                kpos = blk * BLOCK_SIZE + p0 % BLOCK_SIZE + offs_n
            else:
                blk = tl.load(p_idx + (pos // BLOCK_SIZE) * stride_ij, mask=valid, other=-1)
                blk = blk.to(tl.int64)
                kpos = blk * BLOCK_SIZE + pos % BLOCK_SIZE
            valid = valid & (blk >= 0) & (kpos < seqlen)
        else:
            kpos = pos
        if PAGED:
            if TILE_IN_BLOCK:
                if SPARSE:
                    # a -1 (padding) block would index the table at -1: read entry 0 instead
                    page = tl.load(p_tab + tl.maximum(blk, 0) * stride_tp)
                else:
                    page = tl.load(p_tab + (p0 // BLOCK_SIZE) * stride_tp)
                slot = p0 % BLOCK_SIZE + offs_n
            else:
                page = tl.load(p_tab + (kpos // BLOCK_SIZE) * stride_tp, mask=valid, other=0)
                slot = kpos % BLOCK_SIZE
            row_k = page.to(tl.int64) * stride_kb + slot * stride_kn
            row_v = page.to(tl.int64) * stride_vb + slot * stride_vn
        else:
            row_k = kpos * stride_kn
            row_v = kpos * stride_vn
        # a D mask only when D is padded: a per-row mask keeps the loads 16-byte vectors
        if BLOCK_D == HEAD_DIM:
            m_kv = valid[:, None]
        else:
            m_kv = valid[:, None] & m_d[None, :]
        # [BLOCK_N, BLOCK_D]
        b_k = tl.load(K_base + row_k[:, None] + offs_d[None, :] * stride_kd, mask=m_kv, other=0.0)
        # [BLOCK_M, BLOCK_N] raw scores; scale (with log2 e) folded into the exp2's argument
        s = tl.dot(b_q, tl.trans(b_k))
        visible = valid[None, :] & (kpos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_blk = tl.max(s, 1) * qk_scale
        skip = False
        if USE_THRESHOLD:
            skip = _threshold_skip(m_blk, m_i, log2_threshold)
        if not skip:
            p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, m_blk, qk_scale, True)
            b_v = tl.load(V_base + row_v[:, None] + offs_d[None, :] * stride_vd, mask=m_kv,
                          other=0.0)
            acc = tl.dot(p.to(b_v.dtype), b_v, acc)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    # log2-units lse; -inf for rows (or whole splits) that saw no key
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    if NUM_SPLITS == 1:
        p_o = (Out + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_om
               + offs_d[None, :] * stride_od)
        tl.store(p_o, out.to(Out.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
        if RETURN_LSE:
            hq = num_kv_heads * GROUP
            tl.store(Lse + (b * hq + head) * SQ + tok, lse2 * 0.6931471805599453, mask=m_row)
    else:
        # partials are contiguous [B, Hq, SQ, NUM_SPLITS, (D)] float32
        hq = num_kv_heads * GROUP
        row = ((b * hq + head) * SQ + tok) * NUM_SPLITS + split
        tl.store(LsePart + row, lse2, mask=m_row)
        tl.store(OutPart + row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=m_row[:, None] & m_d[None, :])


@triton.jit
def _decode_combine_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    num_q_heads,
    SQ: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, head, token) flattened
    tok = row % SQ
    head = (row // SQ) % num_q_heads
    b = row // (SQ * num_q_heads)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    m_s = offs_s < NUM_SPLITS
    m_d = offs_d < HEAD_DIM
    lse = tl.load(LsePart + row * NUM_SPLITS + offs_s, mask=m_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # [SPLITS_P2]
    total = tl.sum(w, 0)
    # [SPLITS_P2, BLOCK_D]
    parts = tl.load(OutPart + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=m_s[:, None] & m_d[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_ob + head * stride_oh + tok * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=m_d)
    if RETURN_LSE:
        lse_out = tl.where(total == 0.0, float("-inf"), (m_safe + tl.math.log2(total)))
        tl.store(Lse + row, lse_out * 0.6931471805599453)


# (BLOCK_N, num_warps, num_stages) per padded head dim: a memory-bound loop, so enough stages to
# keep several K/V tiles in flight per program (scripts/aot_check.py numbers in the bench notes)
_CONFIGS = {
    64: (64, 4, 4),
    128: (64, 4, 3),
    256: (32, 4, 3),
}
MAX_SPLITS = 64
# splits until the grid holds about this many programs per SM: one wave (about 3 programs of
# the default configs fit an SM by shared memory), so no tail of a second wave
_PROGRAMS_PER_SM = 2
# but at least this many splits where the length allows: at batch 8 (64 programs per split)
# 16 splits measured 4% faster than the one-wave count of 5 (H100, 128k, bench_decode sweep)
_MIN_SPLITS = 16
# fewest key tiles a split should loop over (partials and the combine are not free)
_MIN_TILES_PER_SPLIT = 4
# most rows of a tile (query heads x tokens); a larger group is cut into head tiles
_MAX_ROWS = 64


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a head dim."""
    if device.type != "cuda":
        return (32, 4, 1)
    padded = max(16, triton.next_power_of_2(head_dim))
    key = min(_CONFIGS, key=lambda d: abs(d - padded))
    return _CONFIGS[key]


def num_splits_for(programs: int, stream_max: int, block_n: int, device: torch.device,
                   max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(splits, keys per split) from shapes only: enough programs to fill the SMs, each split
    looping over at least a few tiles; the keys per split are a multiple of ``block_n``."""
    tiles = max(1, triton.cdiv(stream_max, block_n))
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
    want = max(_MIN_SPLITS, triton.cdiv(_PROGRAMS_PER_SM * sms, max(1, programs)))
    splits = max(1, min(want, max_splits, triton.cdiv(tiles, _MIN_TILES_PER_SPLIT)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    return splits, tiles_per_split * block_n


def decode_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
    block_indices: torch.Tensor | None, cache_seqlens: torch.Tensor | None,
    block_table: torch.Tensor | None, block_size: int, scale: float,
    softmax_threshold: float | None, return_lse: bool,
    num_splits: int | None = None, config: tuple | None = None,
):
    """Launch the split and combine kernels. Inputs are assumed validated
    (see sparse_attn.ops.decode).

    Contiguous caches are ``[B, Hkv, S_max, D]``; paged caches ``[num_pages, page_size, Hkv, D]``
    with ``block_table [B, max_pages]`` (then ``block_size`` is the page size).

    Returns ``(out [B, Hq, Sq, D], lse [B, Hq, Sq] float32 or None)``.
    """
    batch, hq, sq, head_dim = q.shape
    paged = block_table is not None
    if paged:
        hkv = k_cache.shape[2]
        capacity = block_table.shape[1] * block_size
        # strides as (page, head, slot, dim)
        k_strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), k_cache.stride(3))
        v_strides = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), v_cache.stride(3))
    else:
        hkv = k_cache.shape[1]
        capacity = k_cache.shape[2]
        k_strides, v_strides = k_cache.stride(), v_cache.stride()
    group = hq // hkv
    block_n, num_warps, num_stages = config or default_config(head_dim, q.device)
    tile_in_block = block_size % block_n == 0
    if q.device.type == "cuda":
        # each level of indirection (page number; per-row block index) takes two pipeline
        # stages before the K/V loads that depend on it: without them a paged cache gets a
        # single K/V buffer (sm_90 compile of the default configs, .scratch/aot_decode.py)
        depth = int(block_table is not None) + int(block_indices is not None and not tile_in_block)
        num_stages += 2 * depth
    heads_per_tile = max(1, min(group, _MAX_ROWS // sq))
    num_head_tiles = triton.cdiv(group, heads_per_tile)
    block_m = max(16, triton.next_power_of_2(heads_per_tile * sq))
    sparse = block_indices is not None
    nsel = block_indices.shape[2] if sparse else 0
    stream_max = nsel * block_size if sparse else capacity
    programs = batch * hkv * num_head_tiles
    if num_splits is None:
        splits, per_split = num_splits_for(programs, stream_max, block_n, q.device)
    else:
        tiles = max(1, triton.cdiv(stream_max, block_n))
        splits = max(1, min(num_splits, tiles))
        per_split = triton.cdiv(tiles, splits) * block_n
        splits = triton.cdiv(tiles, per_split // block_n)

    out = _empty((batch, hq, sq, head_dim), q.dtype, q.device)
    lse = (_empty((batch, hq, sq), torch.float32, q.device)
           if return_lse else None)
    if splits > 1:
        out_part = _empty((batch, hq, sq, splits, head_dim), torch.float32, q.device)
        lse_part = _empty((batch, hq, sq, splits), torch.float32, q.device)
    else:
        out_part = lse_part = out  # never written
    dummy_i = (cache_seqlens if cache_seqlens is not None
               else torch.zeros(1, dtype=torch.int32, device=q.device))
    table = block_table if paged else dummy_i.view(1, -1)
    idx = block_indices if sparse else dummy_i.view(1, 1, -1)
    use_threshold = softmax_threshold is not None and softmax_threshold > 0
    log2_threshold = math.log2(softmax_threshold) if use_threshold else float("-inf")
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(programs * splits,)](
        q, k_cache, v_cache, out_part, lse_part, out, lse if lse is not None else out,
        dummy_i, table, idx,
        *q.stride(), *k_strides, *v_strides, *out.stride(),
        table.stride(0), table.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        hkv, capacity, nsel, per_split, scale * 1.4426950408889634, log2_threshold,
        SQ=sq, GROUP=group, HEADS_PER_TILE=heads_per_tile, NUM_HEAD_TILES=num_head_tiles,
        NUM_SPLITS=splits, BLOCK_SIZE=block_size, TILE_IN_BLOCK=tile_in_block,
        PAGED=paged, SPARSE=sparse,
        HAS_SEQLENS=cache_seqlens is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, BLOCK_D=block_d,
        USE_THRESHOLD=use_threshold, RETURN_LSE=return_lse, NUM_STAGES=num_stages,
        num_warps=num_warps,
    )
    if splits > 1:
        _decode_combine_kernel[(batch * hq * sq,)](
            out_part, lse_part, out, lse if lse is not None else out,
            *out.stride(), hq,
            SQ=sq, NUM_SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d, RETURN_LSE=return_lse,
            num_warps=4,
        )
    return out, lse
