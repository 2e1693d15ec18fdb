"""Pure-torch block estimation (the CPU path and the ground truth of kernels/estimate.py)."""
from __future__ import annotations

import torch

__all__ = ["block_scores_ref", "quantize_int8_ref", "sample_rows"]

# keep a chunk's fp32 score tensor near this many bytes
_CHUNK_BYTES = 128 * 2**20


def sample_rows(seqlen_q: int, block_m: int, rows: int, device=None) -> torch.Tensor:
    """Positions of ``rows`` evenly strided query rows per query block, each block's last row
    included (the rows that see the most keys): int32 ``[NQB * rows]``, clamped into the
    sequence (a short last block repeats its last row)."""
    nqb = -(-seqlen_q // block_m)
    step = block_m // rows
    offs = torch.arange(1, rows + 1, device=device) * step - 1  # [rows]
    pos = torch.arange(nqb, device=device)[:, None] * block_m + offs[None, :]
    return pos.clamp(max=seqlen_q - 1).flatten().to(torch.int32)


def quantize_int8_ref(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block int8 quantization of ``x [B, H, S, D]`` (see
    ``kernels/estimate.py: quantize_int8``): ``(xq int8, scale fp32 [B, H, ceil(S / block)])``."""
    batch, heads, seqlen, dim = x.shape
    nblk = -(-seqlen // block)
    pad = nblk * block - seqlen
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).unflatten(2, (nblk, block))
    amax = xf.abs().amax(dim=(3, 4))  # [B, H, nblk]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    y = xf / scale[..., None, None]
    y = torch.where(y >= 0, torch.floor(y + 0.5), -torch.floor(-y + 0.5))
    return y.to(torch.int8).flatten(2, 3)[:, :, :seqlen], scale


def block_scores_ref(q_rows: torch.Tensor, k: torch.Tensor, row_pos: torch.Tensor, *,
                     rows: int, block_n: int, seqlen_q: int, causal: bool, scale: float,
                     q_scale: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     window: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean sampled-row softmax mass per (query block, key block), as ``block_scores`` of
    kernels/estimate.py (same arguments; int8 inputs are dequantized exactly in fp32).

    Returns:
        fp32 ``[B, Hs, NQB, ceil(Sk / block_n)]``.
    """
    batch, hs, nrows, dim = q_rows.shape
    hkv, seqlen_k = k.shape[1], k.shape[2]
    group = hs // hkv
    nqb = nrows // rows
    nkb = -(-seqlen_k // block_n)
    qf = q_rows.float()
    kf = k.float()
    if q_rows.dtype == torch.int8:
        qf = qf * q_scale.repeat_interleave(rows, dim=2)[..., None]
        kf = kf * k_scale.repeat_interleave(block_n, dim=2)[:, :, :seqlen_k, None]
    kt = kf.transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Sk]
    pos = row_pos.long().to(q_rows.device) + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=q_rows.device)
    out = torch.zeros(batch, hs, nqb, nkb, dtype=torch.float32, device=q_rows.device)
    per_block = max(1, _CHUNK_BYTES // max(1, batch * hs * rows * seqlen_k * 4))
    for m0 in range(0, nqb, per_block):
        m1 = min(nqb, m0 + per_block)
        r0, r1 = m0 * rows, m1 * rows
        qc = qf[:, :, r0:r1].unflatten(1, (hkv, group))
        s = torch.matmul(qc, kt).flatten(1, 2) * scale  # [B, Hs, r, Sk]
        p_r = pos[r0:r1, None]
        ok = torch.ones_like(s[0, 0], dtype=torch.bool)
        if causal:
            ok = cols[None, :] <= p_r
        norm_ok = ok
        if window is not None:
            sink, local = window
            row_lo = (p_r // block_n - local + 1) * block_n
            norm_ok = ok & ((cols[None, :] < sink * block_n) | (cols[None, :] >= row_lo))
        sn = s.masked_fill(~norm_ok, float("-inf"))
        m = sn.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        l = torch.exp(sn - m).sum(-1, keepdim=True)
        p = torch.exp((s.masked_fill(~ok, float("-inf")) - m).clamp(max=100 / 1.4426950408889634))
        p = torch.where(l > 0, p / l, torch.zeros_like(p))
        p = torch.nn.functional.pad(p, (0, nkb * block_n - seqlen_k))
        p = p.unflatten(-1, (nkb, block_n)).sum(-1)  # [B, Hs, r, NKB]
        out[:, :, m0:m1] = p.unflatten(2, (m1 - m0, rows)).mean(3)
    return out
