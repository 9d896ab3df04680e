#!/usr/bin/env bash
# ncu of every kernel in one call of the op: duration, DRAM bytes, throughputs.
#   bash tools/ncu_probe.sh "1 128 8192" [local_experts]   (NCU_CACHE=none: keep caches warm)
# XLA's memory preallocation is off: with it, ncu's kernel replay cannot save the memory a large
# GEMM writes (the T=8192 profile fails) and every size takes ~5 min; without it ~20 s.
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
out=${OUT:-/tmp}
# L2 reads by the SMs (sectors looked up, and hits) as well: NCU_L2=1
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread
[ "${NCU_L2:-0}" = 1 ] && M=$M,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_sectors.avg.pct_of_peak_sustained_elapsed
for t in $1; do
  f=$out/ncu_t${t}_e${2:-256}.csv
  ncu --profile-from-start off --clock-control none --cache-control ${NCU_CACHE:-all} --metrics $M --csv --page raw \
    python tools/probe_moe.py --tokens $t --local-experts ${2:-256} --profile > $f 2> $out/ncu_err_$t.log
  echo "== T=$t E_loc=${2:-256}"
  python - $f <<'PY'
import csv, sys
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = list(csv.DictReader(lines))[1:]  # first data row holds units
num = lambda x: float(x.replace(",", "")) if x else 0.0  # ncu writes 11,392
tot = 0
for r in rows:
    name = r["Kernel Name"].replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
    short = "gemm" if "GemmUniversal" in name else name.split("(")[0].split("<")[0].split("::")[-1].split()[-1]
    us = num(r["gpu__time_duration.sum"]) / 1e3
    tot += us
    rd = num(r["dram__bytes_read.sum"]) / 1e6
    wr = num(r["dram__bytes_write.sum"]) / 1e6
    g = lambda k: r.get(k, "-")
    print(f"{short[:28]:<28} {us:9.1f}us rd {rd:9.1f}MB wr {wr:8.1f}MB {rd / us if us else 0:5.2f}TB/s "
          f"sm {g('sm__throughput.avg.pct_of_peak_sustained_elapsed')[:5]}% mem {g('gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed')[:5]}% "
          f"grid {g('launch__grid_size')} regs {g('launch__registers_per_thread')}"
          + (f" L2 rd {num(r['lts__t_sectors_srcunit_tex_op_read.sum']) * 32 / 1e9:6.2f}GB hit "
             f"{num(r['lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum']) * 32 / 1e9:6.2f}GB "
             f"L2 busy {g('lts__t_sectors.avg.pct_of_peak_sustained_elapsed')[:5]}%"
             if "lts__t_sectors_srcunit_tex_op_read.sum" in r else ""))
print(f"sum of kernel time {tot:.1f} us")
PY
  tail -3 $out/ncu_err_$t.log
done
