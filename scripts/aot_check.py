"""Compile the block-sparse kernel for sm_90 on a machine without a GPU and report what the
compiler made of it (shared memory, registers, spills, wgmma, pipelined async copies).

Usage: python scripts/aot_check.py [--head-dim 128] [--block-m 128] [--block-n 128]
       [--warps 8] [--stages 3] [--threshold] [--dtype bf16] [--tma] [--dump PREFIX]
"""
import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_attn.kernels.block_sparse import _block_sparse_fwd_kernel as kernel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--layout-bn", type=int, default=128)
    ap.add_argument("--pack", type=int, default=4)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--threshold", action="store_true")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--tma", action="store_true")
    ap.add_argument("--dump", help="write the PTX and SASS here")
    a = ap.parse_args()
    dt = a.dtype
    ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Out": f"*{dt}", "Lse": "*fp32",
            "Counts": "*i32", "Indices": "*i32", "Stats": "*i32"}
    const = dict(GROUP=4, PACK=a.pack, LAYOUT_PER_KV_HEAD=True, LAYOUT_BM=128,
                 LAYOUT_BN=a.layout_bn, BLOCK_M=a.block_m, BLOCK_N=a.block_n,
                 HEAD_DIM=a.head_dim, BLOCK_D=a.head_dim, IS_CAUSAL=True,
                 USE_THRESHOLD=a.threshold, RETURN_LSE=True, USE_TMA=a.tma)
    sig, attrs = {}, {}
    for i, n in enumerate(kernel.arg_names):
        if n in ptrs:
            sig[n] = ptrs[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in const:
            sig[n] = "constexpr"
        elif n.endswith("_d") or n in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_ij"):
            sig[n] = "constexpr"  # unit strides are specialised at run time too
            const[n] = 1
        elif n in ("qk_scale", "log2_threshold"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=a.warps, num_stages=a.stages))
    ttgir = ck.asm["ttgir"]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        if a.dump:
            open(a.dump + ".ptx", "w").write(ck.asm["ptx"])
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True)
            open(a.dump + ".sass", "w").write(sass.stdout)
    regs = re.findall(r"REG:(\d+)", usage)
    stack = re.findall(r"STACK:(\d+)", usage)
    print(f"shared={ck.metadata.shared} regs={regs} stack={stack} "
          f"wgmma={ck.asm['ptx'].count('wgmma.mma_async')} "
          f"async_copies={ttgir.count('async_copy_global_to_local')} "
          f"tma={ttgir.count('async_tma_copy')}")


if __name__ == "__main__":
    main()
