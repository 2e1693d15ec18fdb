"""Token-level top-k attention forward: every query token attends to its own list of key
positions (DeepSeek sparse attention, HISA), gathered from K and V BLOCK_N rows at a time.

How the tensor-core tile is formed. A token attends to K gathered keys with only G = Hq/Hkv
query heads sharing its list: one token alone is a [G, D] x [D, BLOCK_N] product, far below the
tensor cores' M (16 for mma, 64 per warpgroup for wgmma). So a program owns the rows
M = G_PAD heads x TOKENS consecutive query tokens of one KV head (row r: head r // TOKENS, token
r % TOKENS; G_PAD = next power of two of G, spare rows masked) and iterates over key chunks of
BLOCK_N gathered positions; each chunk carries an owner mask saying which tokens (rows) listed
each position, and the other rows see -inf. Two ways to form the chunks (MERGED constexpr):

* MERGED=False: the chunks of token 0's list, then token 1's, ...: row mask "row's token is t".
  No preprocessing, but each chunk does useful work in only G of the M rows: T x the needed
  MMA work, and a key shared by neighbours is loaded once per token.
* MERGED=True: the sorted union of the TOKENS tokens' lists, with a TOKENS-bit owner word per
  position (``merge_token_lists``, torch on the device, no host sync). Neighbouring tokens'
  top-k sets overlap heavily in real attention (local window, sinks, shared "heavy" keys), so
  the union is close to K and each gathered K/V row serves all M rows: the loads drop T-fold
  and the MMA work stays near the useful one. With disjoint sets the union is T x K and the
  cost equals MERGED=False's plus the merge.

Cost per query token: loads ~ |union| / T x D x 4 bytes, MMA ~ |union| x G_PAD x D x 4 flops.
bench/bench_topk.py measures both modes and several TOKENS; the defaults below follow it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse import _softmax_step


@triton.jit
def _gather_rows(base, idx, stride_n, stride_d,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows ``idx`` of a K or V head (-1 entries read row 0: the caller masks
    their scores; an unpredicated load is cheaper than a masked one)."""
    offs_d = tl.arange(0, BLOCK_D)
    safe = tl.where(idx >= 0, idx, 0).to(tl.int64)
    ptrs = base + safe[:, None] * stride_n + offs_d[None, :] * stride_d
    if BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _topk_fwd_kernel(
    Q, K, V, Out, Lse, Idx, Bits, Counts,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ib, stride_ih, stride_im, stride_ij,
    seqlen_q, seqlen_k, list_len, num_kv_heads, num_m_tiles, qk_scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, MERGED: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    # Idx: per token [B, Hkv, Sq, K] (MERGED=False) or per tile [B, Hkv, NT, T*K] with Bits
    # (same shape and strides) and Counts [B, Hkv, NT] (MERGED=True).
    # (batch, KV head) varies fastest, query tiles run last-first (causal: heavier first)
    pid = tl.program_id(0).to(tl.int64)
    num_bh = tl.num_programs(0).to(tl.int64) // num_m_tiles
    pid_bh = pid % num_bh
    pid_m = num_m_tiles - 1 - pid // num_bh
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    t0 = pid_m * TOKENS
    offset = seqlen_k - seqlen_q  # queries are aligned to the end of the keys

    BLOCK_M: tl.constexpr = G_PAD * TOKENS
    offs_r = tl.arange(0, BLOCK_M)
    g = offs_r // TOKENS
    row_t = offs_r % TOKENS  # the row's token within the tile
    head = h_kv * GROUP + g
    tok = t0 + row_t
    row_pos = tok + offset
    m_row = (tok < seqlen_q) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM

    p_q = (Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qm
           + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    K_base = K + b * stride_kb + h_kv * stride_kh
    V_base = V + b * stride_vb + h_kv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    if MERGED:
        p_idx = Idx + b * stride_ib + h_kv * stride_ih + pid_m * stride_im
        p_bits = Bits + b * stride_ib + h_kv * stride_ih + pid_m * stride_im
        n_iter = tl.cdiv(tl.load(Counts + pid_bh * num_m_tiles + pid_m), BLOCK_N)
    else:
        p_idx = Idx + b * stride_ib + h_kv * stride_ih + t0 * stride_im
        n_chunks = tl.cdiv(list_len, BLOCK_N)
        n_iter = TOKENS * n_chunks
    # one flat loop (a single gather site keeps one set of pipeline buffers)
    for j in range(0, n_iter):
        if MERGED:
            offs = j * BLOCK_N + offs_n
            m_slot = offs < list_len
            idx = tl.load(p_idx + offs * stride_ij, mask=m_slot, other=-1)
            bits = tl.load(p_bits + offs * stride_ij, mask=m_slot, other=0)
            # [BLOCK_M, BLOCK_N] row owns the position iff its token's bit is set
            own = ((bits[None, :] >> row_t[:, None]) & 1) != 0
        else:
            t = j // n_chunks
            offs = (j % n_chunks) * BLOCK_N + offs_n
            m_slot = (offs < list_len) & (t0 + t < seqlen_q)
            idx = tl.load(p_idx + t * stride_im + offs * stride_ij, mask=m_slot, other=-1)
            own = row_t[:, None] == t
        visible = own & (idx[None, :] >= 0)
        if IS_CAUSAL:
            visible = visible & (idx[None, :] <= row_pos[:, None])
        b_k = _gather_rows(K_base, idx, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)
        # [BLOCK_M, BLOCK_N] raw scores; the scale (with log2 e) is folded into exp2's FMA
        s = tl.dot(b_q, tl.trans(b_k))
        s = tl.where(visible, s, float("-inf"))
        m_blk = tl.max(s, 1) * qk_scale
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, m_blk, qk_scale, True)
        b_v = _gather_rows(V_base, idx, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
        acc = tl.dot(p.to(b_v.dtype), b_v, acc)

    # rows that saw no key: l = 0, output 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    p_o = (Out + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_om
           + offs_d[None, :] * stride_od)
    tl.store(p_o, out.to(Out.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    if RETURN_LSE:
        # Lse is contiguous [B, Hq, Sq]; m is in log2 units
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        p_lse = Lse + (b * (num_kv_heads * GROUP) + head) * seqlen_q + tok
        tl.store(p_lse, lse, mask=m_row)


# (BLOCK_N, num_warps, num_stages) per head dim for bf16/fp16 on an H100, by tile rows (up to
# 32 rows: mma.sync tiles; 64 and more: wgmma). Compiled for sm_90 with no spills
# (.scratch/aot_topk.py, D=128 G=4: 16 rows 158 regs, 64 rows 254 regs / 4 warps, 128 rows
# 252 regs / 8 warps; 128 rows on 4 warps spill). The gathered loads go through cp.async.
_HOPPER_CONFIGS = {
    # head dim: (config for <= 64 rows, config for >= 128 rows)
    64: ((64, 4, 3), (64, 8, 3)),
    128: ((64, 4, 3), (64, 8, 2)),
    256: ((32, 4, 2), (32, 8, 2)),
}


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                   rows: int = 16) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a head dim, dtype and tile rows."""
    padded = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return (32, 4, 1)
    if dtype == torch.float32:
        return (32, 4 if rows <= 64 else 8, 2)
    key = min(_HOPPER_CONFIGS, key=lambda d: abs(d - padded))
    return _HOPPER_CONFIGS[key][rows >= 128]


def default_tokens(group: int, merged: bool) -> int:
    """TOKENS per tile: rows M = G_PAD x TOKENS. Unmerged, 16 rows (the smallest tensor-core
    M; more rows only add masked work). Merged, 64 rows (one wgmma M) to amortise the gathers."""
    g_pad = triton.next_power_of_2(group)
    # at most 32 tokens: the merged owner words are 32-bit
    return min(32, max(1, (64 if merged else 16) // g_pad))


def merge_token_lists(indices: torch.Tensor, tokens: int, chunk_elems: int = 1 << 26
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted union of the key lists of each run of ``tokens`` consecutive query tokens.

    Args:
        indices: int32 ``[B, H, Sq, K]`` (-1 padded, no duplicates per row).
        tokens: tokens per tile (1..32).

    Returns:
        ``(union [B, H, NT, T*K] int32 (-1 padded), owners [B, H, NT, T*K] int32 (bit t set
        when the tile's token t lists the position), counts [B, H, NT] int32)`` with
        ``NT = ceil(Sq / T)``. Device-side only (a segmented sort over T*K keys per tile), in
        chunks of tiles so its scratch stays near ``chunk_elems`` keys.
    """
    if not 1 <= tokens <= 32:
        raise ValueError(f"merge_token_lists: tokens must lie in [1, 32], got {tokens}")
    batch, heads, sq, topk = indices.shape
    nt = triton.cdiv(sq, tokens)
    width = tokens * topk
    dev = indices.device
    if nt * tokens != sq:
        pad = indices.new_full((batch, heads, nt * tokens - sq, topk), -1)
        indices = torch.cat([indices, pad], dim=2)
    tiles = indices.view(batch, heads, nt, tokens, topk)
    union = torch.empty((batch, heads, nt, width), dtype=torch.int32, device=dev)
    owners = torch.empty_like(union)
    counts = torch.empty((batch, heads, nt), dtype=torch.int32, device=dev)
    big = torch.iinfo(torch.int32).max
    tok_id = torch.arange(tokens, device=dev, dtype=torch.int32)[:, None]
    step = max(1, chunk_elems // max(1, batch * heads * width))
    for a in range(0, nt, step):
        z = min(nt, a + step)
        x = tiles[:, :, a:z]
        # key = position * T + token, padding last: one sort orders positions, ties by token
        key = torch.where(x >= 0, x * tokens + tok_id, big).reshape(batch, heads, z - a, width)
        key = key.sort(-1).values
        valid = key != big
        pos = torch.where(valid, key // tokens, -1)
        first = valid.clone()
        first[..., 1:] &= pos[..., 1:] != pos[..., :-1]
        run = first.cumsum(-1, dtype=torch.int64) - 1
        cnt = first.sum(-1, dtype=torch.int32)
        # invalid entries land in a spare column that is dropped
        dst = torch.where(valid, run, width)
        u = torch.full((batch, heads, z - a, width + 1), -1, dtype=torch.int32, device=dev)
        u.scatter_(-1, dst, pos)
        bit = torch.where(valid, torch.ones_like(key) << (key % tokens), 0)
        o = torch.zeros_like(u)
        o.scatter_add_(-1, dst, bit)  # distinct bits per position: the sum is their OR
        union[:, :, a:z] = u[..., :width]
        owners[:, :, a:z] = o[..., :width]
        counts[:, :, a:z] = cnt
    return union, owners, counts


def topk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, *,
             causal: bool, scale: float, return_lse: bool, tokens: int | None = None,
             merged: bool = False, merged_lists: tuple | None = None,
             config: tuple | None = None):
    """Launch the kernel. Inputs are assumed validated (see sparse_attn.ops.topk).

    ``merged_lists`` is a precomputed ``merge_token_lists(indices, tokens)``.
    Returns ``(out [B, Hq, Sq, D], lse [B, Hq, Sq] or None)``.
    """
    batch, hq, seqlen_q, head_dim = q.shape
    hkv, seqlen_k = k.shape[1], k.shape[2]
    group = hq // hkv
    g_pad = triton.next_power_of_2(group)
    if tokens is None:
        tokens = default_tokens(group, merged)
    # at least 16 rows: the smallest tensor-core tile
    tokens = max(tokens, triton.cdiv(16, g_pad))
    block_n, num_warps, num_stages = config or default_config(head_dim, q.dtype, q.device,
                                                              g_pad * tokens)
    num_m_tiles = triton.cdiv(seqlen_q, tokens)
    out = torch.empty((batch, hq, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    lse = (torch.empty((batch, hq, seqlen_q), dtype=torch.float32, device=q.device)
           if return_lse else None)
    if merged:
        if merged_lists is None:
            merged_lists = merge_token_lists(indices, tokens)
        idx, bits, counts = merged_lists
        if idx.shape[2] != num_m_tiles or idx.shape[3] != tokens * indices.shape[3]:
            raise ValueError(
                f"merged lists {tuple(idx.shape)} were built for another TOKENS than {tokens}")
    else:
        idx, bits, counts = indices, indices, indices  # bits/counts unused
    grid = (batch * hkv * num_m_tiles,)
    _topk_fwd_kernel[grid](
        q, k, v, out, lse if lse is not None else out, idx, bits, counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *idx.stride(),
        seqlen_q, seqlen_k, idx.shape[3], hkv, num_m_tiles, scale * 1.4426950408889634,
        GROUP=group, G_PAD=g_pad, TOKENS=tokens, MERGED=merged,
        BLOCK_N=block_n, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        IS_CAUSAL=causal, RETURN_LSE=return_lse,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
