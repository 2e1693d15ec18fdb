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
* MERGED=True (the default of topk_attention): the union of the TOKENS tokens' lists, with a
  TOKENS-bit owner word per position that also holds causality (``merge_token_lists``:
  O(T*K) per tile, no sort, no host sync; a CUDA kernel with a shared-memory hash table when
  the extension loads, else a Triton pass of atomic ORs into a per-program owner array).
  Neighbouring tokens' top-k sets overlap heavily in real attention (local window,
  sinks, shared "heavy" keys), so the union is close to K and each gathered K/V row serves all
  M rows: the loads drop T-fold and the MMA work stays near the useful one. With disjoint sets
  the union is T x K and the kernel does T x the useful MMA work, plus the merge.

Cost per query token: loads ~ |union| / T x D x 4 bytes, MMA ~ |union| x G_PAD x D x 4 flops.
Measured (H100, 128k, 32/8 heads, d=128, bf16, causal, K=2048; block-sparse kernel 9.9 ms at
the same keys): per-token 171 ms (17.9x: 4x wasted MMA rows, every token re-gathers its 2048
K/V rows); merged T=32, union cached 13.1 ms (1.32x); the merge itself 5.7 ms on the CUDA
kernel (1.89x with it), 35 ms with the Triton one, 371 ms as a torch segmented sort. Random
disjoint lists (union 11-18x K): per-token 299 ms beats merged (240 ms kernel + 122 ms CUDA
merge): use merge=False there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _cuda
from .block_sparse import _softmax_step

MERGE_BACKENDS = ("auto", "cuda", "triton")


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
        count = tl.load(Counts + pid_bh * num_m_tiles + pid_m)
        n_iter = tl.cdiv(count, BLOCK_N)
        # owner bits of every token of the tile (rows past the query length are not stored)
        full = ((1 << tl.minimum(seqlen_q - t0, TOKENS).to(tl.int64)) - 1).to(tl.int32)
    else:
        p_idx = Idx + b * stride_ib + h_kv * stride_ih + t0 * stride_im
        n_chunks = tl.cdiv(list_len, BLOCK_N)
        n_iter = TOKENS * n_chunks
    # one flat loop (a single gather site keeps one set of pipeline buffers). A variant with a
    # separate unmasked loop over keys that every token of the tile owns was slower on an H100
    # (14.3 vs 13.4 ms at 128k, K=2048, T=32); a per-chunk test that skips the mask gains 3%.
    for j in range(0, n_iter):
        if MERGED:
            offs = j * BLOCK_N + offs_n
            m_slot = offs < count
            idx = tl.load(p_idx + offs * stride_ij, mask=m_slot, other=0)
            bits = tl.load(p_bits + offs * stride_ij, mask=m_slot, other=0)
            # [BLOCK_M, BLOCK_N]: the row's token owns the position. The owner words already
            # hold causality (merge_token_lists drops future keys per token): one mask only.
            visible = ((bits[None, :] >> row_t[:, None]) & 1) != 0
            # a chunk that every token of the tile owns needs no mask (block pattern at 128k,
            # K=2048, H100: 12.9 vs 13.3 ms)
            masked = tl.min(((bits & full) == full).to(tl.int32), 0) == 0
        else:
            t = j // n_chunks
            offs = (j % n_chunks) * BLOCK_N + offs_n
            m_slot = (offs < list_len) & (t0 + t < seqlen_q)
            idx = tl.load(p_idx + t * stride_im + offs * stride_ij, mask=m_slot, other=-1)
            visible = (row_t[:, None] == t) & (idx[None, :] >= 0)
            if IS_CAUSAL:
                visible = visible & (idx[None, :] <= row_pos[:, None])
            masked = True
        b_k = _gather_rows(K_base, idx, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)
        # [BLOCK_M, BLOCK_N] raw scores; the scale (with log2 e) is folded into exp2's FMA
        s = tl.dot(b_q, tl.trans(b_k))
        if masked:
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
# 64 rows / >= 128 rows). Compiled for sm_90 (.scratch/aot_topk.py, D=128 G=4): 16 rows
# per-token 158 regs; 64 rows merged (64, 4, 3) 190 regs; 128 rows merged (32, 4, 3) 255 regs,
# 8 B stack, no local loads. Measured at 128k, K=2048, block pattern, union cached (H100,
# bench_topk tune section): 128 rows (32, 4, 3) 13.5 ms, (64, 8, 3) 17.5, (128, 8, 2) 17.8,
# (32, 8, 3) 20.4; 64 rows (32, 4, 3) 14.9, (64, 4, 3) 15.0, (128, 4, 2) 18.3, (64, 8, 2)
# 33.6. D=64/256 rows are unmeasured guesses. The gathered loads go through cp.async.
_HOPPER_CONFIGS = {
    # head dim: (config for <= 64 rows, config for >= 128 rows)
    64: ((64, 4, 3), (64, 8, 3)),
    128: ((64, 4, 3), (32, 4, 3)),
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
    M; more rows only add masked work). Merged, 128 rows (at most 32 tokens): measured best
    at 128k (G=4: T=32 13.5 ms vs T=16 14.9 ms, K=2048, union cached)."""
    g_pad = triton.next_power_of_2(group)
    # at most 32 tokens: the merged owner words are 32-bit
    return min(32, max(1, (128 if merged else 16) // g_pad))


@triton.jit
def _merge_kernel(
    Idx, Union, Bits, Counts, Scratch,
    stride_ib, stride_ih, stride_im, stride_ij,
    seqlen_q, list_len, scratch_len, num_heads, num_tiles, total_tiles, causal_offset,
    TOKENS: tl.constexpr, CHUNK: tl.constexpr, CAUSAL: tl.constexpr,
):
    # Persistent: program p owns the zeroed row p of Scratch ([programs, Sk] int32, an owner
    # word per key position) and handles tiles p, p + programs, ... For each token t of the
    # tile and each listed key: atomic OR of bit t into Scratch[key]; the one atomic that sees
    # 0 appends the key to the union (a prefix sum over the chunk). Then the union's owner
    # words are read and cleared in one atomic exchange, so Scratch is zero for the next
    # tile. O(T*K) per tile, no sort; the union comes out in first-seen order (the attention
    # kernel needs no order). Exactly one atomic per address sees 0 whatever the warps'
    # order, so the union has no repeats.
    pid = tl.program_id(0).to(tl.int64)  # int64 tile ids: T*K*tiles may pass 2**31
    scr = Scratch + pid * scratch_len
    offs = tl.arange(0, CHUNK)
    width = TOKENS * list_len
    for tile in range(pid, total_tiles, tl.num_programs(0).to(tl.int64)):
        bh = tile // num_tiles
        m = tile % num_tiles
        p_in = Idx + (bh // num_heads) * stride_ib + (bh % num_heads) * stride_ih
        base = tile * width  # Union and Bits are contiguous [B, H, NT, T*K]
        count = 0
        for t in range(TOKENS):
            tok = m * TOKENS + t
            for c in range(0, list_len, CHUNK):
                o = c + offs
                idx = tl.load(p_in + tok * stride_im + o * stride_ij,
                              mask=(o < list_len) & (tok < seqlen_q), other=-1)
                ok = idx >= 0
                if CAUSAL:
                    ok = ok & (idx <= tok + causal_offset)
                old = tl.atomic_or(scr + idx, 1 << t, mask=ok, sem="relaxed")
                new = ok & (old == 0)
                pos = count + tl.cumsum(new.to(tl.int32), 0) - 1
                tl.store(Union + base + pos, idx, mask=new)
                count += tl.sum(new.to(tl.int32), 0)
        tl.debug_barrier()
        for c in range(0, count, CHUNK):
            o = c + offs
            ok = o < count
            idx = tl.load(Union + base + o, mask=ok, other=0)
            bits = tl.atomic_xchg(scr + idx, 0, mask=ok, sem="relaxed")
            tl.store(Bits + base + o, bits, mask=ok)
        tl.debug_barrier()
        tl.store(Counts + tile, count)


def merge_token_lists(indices: torch.Tensor, tokens: int, *, seqlen_k: int | None = None,
                      causal_offset: int | None = None, backend: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Union of the key lists of each run of ``tokens`` consecutive query tokens, with owner
    bits. Two kernels, neither sorts: the CUDA one (csrc/topk_merge.cu: a (key, owner word) hash
    table in shared memory, the union in slot order; a bitmap fallback for tiles whose union
    overflows it) and a Triton one (atomic OR into a per-program owner array in global memory,
    the union in first-seen order).

    Args:
        indices: int32 ``[B, H, Sq, K]`` (-1 padded, no repeats per row), values < ``seqlen_k``.
        tokens: tokens per tile (1..32).
        seqlen_k: key length (default: the largest index + 1, which syncs with the host).
        causal_offset: when given, token ``i`` keeps only keys ``<= i + causal_offset``
            (``Sk - Sq`` for causal attention): the owner bits then encode causality.
        backend: ``"auto"`` (CUDA when the extension is loaded and ``indices`` is on a GPU,
            else Triton), ``"cuda"`` or ``"triton"``.

    Returns:
        ``(union [B, H, NT, T*K] int32, owners [B, H, NT, T*K] int32 (bit t set when the
        tile's token t lists the position), counts [B, H, NT] int32)`` with
        ``NT = ceil(Sq / T)``; entries ``[..., :counts]`` are valid (each key once), the rest
        is unspecified.

    Example:
        >>> union, owners, counts = merge_token_lists(layout.indices, 16, seqlen_k=8192,
        ...                                           causal_offset=0)
    """
    if not 1 <= tokens <= 32:
        raise ValueError(f"merge_token_lists: tokens must lie in [1, 32], got {tokens}")
    if backend not in MERGE_BACKENDS:
        raise ValueError(f"merge_token_lists: backend must be one of {MERGE_BACKENDS}, got "
                         f"{backend!r}")
    if seqlen_k is None:
        seqlen_k = int(indices.max()) + 1
    if backend == "cuda" or (backend == "auto" and indices.is_cuda and _cuda.available()):
        return _cuda.merge_token_lists(indices, tokens, seqlen_k=seqlen_k,
                                       causal_offset=causal_offset)
    batch, heads, sq, topk = indices.shape
    nt = triton.cdiv(sq, tokens)
    dev = indices.device
    union = torch.empty((batch, heads, nt, tokens * topk), dtype=torch.int32, device=dev)
    owners = torch.empty_like(union)
    counts = torch.empty((batch, heads, nt), dtype=torch.int32, device=dev)
    total = batch * heads * nt
    if dev.type == "cuda":
        progs = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
    else:
        progs = 4
    progs = max(1, min(total, progs))
    scratch = torch.zeros((progs, max(1, seqlen_k)), dtype=torch.int32, device=dev)
    chunk = min(1024, max(16, triton.next_power_of_2(topk)))
    _merge_kernel[(progs,)](
        indices, union, owners, counts, scratch, *indices.stride(),
        sq, topk, scratch.shape[1], heads, nt, total,
        0 if causal_offset is None else causal_offset,
        TOKENS=tokens, CHUNK=chunk, CAUSAL=causal_offset is not None, num_warps=4)
    return union, owners, counts


def merge_token_lists_torch(indices: torch.Tensor, tokens: int, chunk_elems: int = 1 << 26
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``merge_token_lists`` by a segmented sort in torch (the union sorted, -1 padded, no
    causal filter): the test oracle and the bench's comparison point."""
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

    ``merged_lists`` is a precomputed ``merge_token_lists(indices, tokens, seqlen_k=Sk,
    causal_offset=Sk - Sq if causal else None)`` (its owner bits carry causality).
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
            merged_lists = merge_token_lists(
                indices, tokens, seqlen_k=seqlen_k,
                causal_offset=seqlen_k - seqlen_q if causal else None)
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
