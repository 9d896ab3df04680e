"""Where a kernel's register spills sit: dumps the SASS of the extension (cuobjdump, on the GPU
machine) and, for each function whose name contains every given substring, counts the local
memory accesses (LDL / STL) and how many of them lie between the first and the last wgmma
(HGMMA / QGMMA in SASS: the main loop), printing those.

    python tools/sass_spills.py jax_moe/_ffi*.so OwnGroupedGemmKernelILi128EhLi1E
"""
import re
import subprocess
import sys


def main():
    lib, keys = sys.argv[1], sys.argv[2:]
    sass = subprocess.run(["cuobjdump", "-sass", lib], capture_output=True, text=True).stdout
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        name, body = block.split("\n", 1)
        if not all(k in name for k in keys):
            continue
        lines = [l for l in body.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", l)]
        mma = [i for i, l in enumerate(lines) if "GMMA" in l]
        local = [i for i, l in enumerate(lines) if re.search(r"\b(LDL|STL)\b", l)]
        inner = [i for i in local if mma and mma[0] <= i <= mma[-1]]
        print(f"{name[:120]}\n  {len(lines)} instructions, {len(mma)} wgmma (lines {mma[:1]}..{mma[-1:]}), "
              f"{len(local)} LDL/STL, {len(inner)} of them inside the wgmma span")
        for i in inner[:12]:
            print("   ", lines[i].strip()[:110])


if __name__ == "__main__":
    main()
