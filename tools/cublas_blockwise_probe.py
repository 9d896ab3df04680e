"""What NVIDIA's own library reaches on DeepSeek-V3's blockwise-FP8 GEMM shapes (a reference for
the compute-bound bar of the performance issue): cuBLASLt through PyTorch's scaled_mm with 1 x 128
activation and 128 x 128 weight scales, beside the per-tensor-scaled GEMM the benchmark's ceiling
uses, at the same M x N x K. M is rows of one dense GEMM (every row against one weight matrix: no
expert switching, so an upper bound for a grouped kernel at that many rows in all). Checks each
blockwise result against a float32 dequantized matmul before timing it.

--grouped adds the grouped shapes of tools/gemm_sweep.py (equal rows per group) done with cuBLAS
the only way it offers on Hopper: one blockwise call per group, all captured in one CUDA graph
(so no host launch gaps), and F.scaled_grouped_mm with blockwise recipes where this torch has it.

    python tools/cublas_blockwise_probe.py [--reps 30] [--grouped]
"""
import argparse

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
SHAPES = [  # (label, M, N, K)
    ("gemm1 8192^3 (ceiling shape)", 8192, 8192, 8192),
    ("gemm1 M=512", 512, 4096, 7168),
    ("gemm1 M=1024", 1024, 4096, 7168),
    ("gemm1 M=4096 (EP 4096 rows)", 4096, 4096, 7168),
    ("gemm1 M=16384 (EP 16384 rows)", 16384, 4096, 7168),
    ("gemm1 M=65536 (prefill 8192 rows)", 65536, 4096, 7168),
    ("gemm2 M=16384", 16384, 7168, 2048),
    ("gemm2 M=65536", 65536, 7168, 2048),
]


def timed(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def m_major(sa):
    """Activation scales [M, K/128] in the M-major layout cuBLAS wants (done once, outside the
    timed calls: a copy per call would add a small kernel to each)."""
    return sa.t().contiguous().t()


def blockwise_call():
    """A callable (a, w, a_scale [M, K/128] M-major (m_major), w_scale [N/128, K/128]) -> bf16
    [M, N] through F.scaled_mm (torch >= 2.10, as on the GPU image), and its name."""
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        raise SystemExit(f"torch {torch.__version__} has no F.scaled_mm with blockwise recipes")
    st = F.ScalingType

    def call(a, w, sa, sw):
        return F.scaled_mm(a, w.t(), sa, st.BlockWise1x128, sw.t(), st.BlockWise128x128,
                           output_dtype=torch.bfloat16)
    return call, "F.scaled_mm (BlockWise1x128 x BlockWise128x128)"


GROUPED = [  # (label, groups, rows per group, N, K): tools/gemm_sweep.py's shapes
    ("prefill8192 gemm1", 256, 256, 4096, 7168),
    ("prefill8192 gemm2", 256, 256, 7168, 2048),
    ("ep16384 gemm1", 32, 512, 4096, 7168),
    ("ep16384 gemm2", 32, 512, 7168, 2048),
    ("ep4096 gemm1", 32, 128, 4096, 7168),
    ("prefill2048 gemm1", 256, 64, 4096, 7168),
]


def grouped(call, reps):
    """cuBLAS blockwise per group in one CUDA graph, and F.scaled_grouped_mm if it takes the
    blockwise recipes, at GROUPED's shapes."""
    print(f"{'grouped shape':22s} {'G':>4s} {'rows':>5s} {'N':>5s} {'K':>5s}  {'graph of G calls TF/s':>21s}  scaled_grouped_mm")
    for label, g, rows, n, k in GROUPED:
        torch.manual_seed(g * rows)
        m = g * rows
        a = (torch.randn(m, k, device="cuda") * 0.5).to(FP8)
        w = (torch.randn(g, n, k, device="cuda") * 0.5).to(FP8)
        sa = torch.rand(m, k // 128, device="cuda") * 0.01 + 0.001
        sw = torch.rand(g, n // 128, k // 128, device="cuda") * 0.01 + 0.001
        sa_groups = [m_major(sa[i * rows:(i + 1) * rows]) for i in range(g)]

        def loop():  # each group's output stays where cuBLAS wrote it: no copy kernels
            return [call(a[i * rows:(i + 1) * rows], w[i], sa_groups[i], sw[i]) for i in range(g)]
        flops = 2.0 * m * n * k
        try:
            loop()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop()
            t = timed(graph.replay, reps)
            looped = f"{flops / t / 1e9:21.0f}"
            del graph
        except Exception as e:  # noqa: BLE001
            looped = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
        try:
            F_ = torch.nn.functional
            offs = torch.arange(1, g + 1, device="cuda", dtype=torch.int32) * rows
            sa_all = m_major(sa)
            fn = lambda: F_.scaled_grouped_mm(  # noqa: E731
                a, w.transpose(-2, -1), sa_all, F_.ScalingType.BlockWise1x128,
                sw.transpose(-2, -1), F_.ScalingType.BlockWise128x128, offs=offs,
                output_dtype=torch.bfloat16)
            fn()
            gm = f"{flops / timed(fn, reps) / 1e9:.0f} TF/s"
        except Exception as e:  # noqa: BLE001
            gm = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        print(f"{label:22s} {g:4d} {rows:5d} {n:5d} {k:5d}  {looped}  {gm}", flush=True)
        del a, w, sa, sw, sa_groups
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--grouped", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
    call, name = blockwise_call()
    print(f"blockwise path: {name}")
    if args.grouped:
        grouped(call, args.reps)
    if args.no_dense:
        return
    one = torch.ones((), device="cuda")
    print(f"{'shape':36s} {'M':>6s} {'N':>5s} {'K':>5s}  {'tensor TF/s':>11s}  {'block TF/s':>10s}  block/tensor  rel err")
    for label, m, n, k in SHAPES:
        torch.manual_seed(m + n + k)
        a = (torch.randn(m, k, device="cuda") * 0.5).to(FP8)
        w = (torch.randn(n, k, device="cuda") * 0.5).to(FP8)
        sa = torch.rand(m, k // 128, device="cuda") * 0.01 + 0.001
        sw = torch.rand(n // 128, k // 128, device="cuda") * 0.01 + 0.001
        flops = 2.0 * m * n * k
        t_tensor = timed(lambda: torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one,
                                                  out_dtype=torch.bfloat16), args.reps)
        try:
            sa_mm = m_major(sa)
            out = call(a, w, sa_mm, sw)
            rows = min(m, 256)  # check the first rows against float32 dequantized math
            ad = a[:rows].float() * sa[:rows].repeat_interleave(128, 1)
            wd = w.float() * sw.repeat_interleave(128, 0).repeat_interleave(128, 1)
            ref = ad @ wd.t()
            err = ((out[:rows].float() - ref).norm() / ref.norm()).item()
            t_block = timed(lambda: call(a, w, sa_mm, sw), args.reps)
            block = f"{flops / t_block / 1e9:10.0f}  {t_tensor / t_block:12.2f}  {err:.1e}"
        except Exception as e:  # noqa: BLE001 -- report what this torch / cuBLAS cannot do
            block = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        print(f"{label:36s} {m:6d} {n:5d} {k:5d}  {flops / t_tensor / 1e9:11.0f}  {block}", flush=True)
        del a, w, sa, sw
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
