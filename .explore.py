import os, subprocess, tempfile, re
os.environ["TRITON_INTERPRET"]="0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas
from crmvae_fast.kernels import poe as P
BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
ptxas = get_ptxas(90).path
cfg = P.compile_configs()
for M, bd, nw in [(5, 128, 4), (16, 128, 4), (5, 128, 8)]:
    for k, sig in ((cfg[0][1], cfg[0][2]), (cfg[1][1], cfg[1][2])):
        const = dict(cfg[0][3], BLOCK_M=triton.next_power_of_2(M), BLOCK_D=bd)
        c = triton.compile(ASTSource(fn=k, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
        f = tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False); f.write(c.asm["ptx"]); f.close()
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/tmp/x.cubin"], capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", out).group(1); spill = re.search(r"(\d+) bytes spill stores", out).group(1)
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", "/tmp/x.cubin"], capture_output=True, text=True).stdout
        ins = [(int(m.group(1), 16), l) for l in sass.splitlines() for m in [re.search(r"/\*([0-9a-f]{4})\*/", l)] if m]
        # the S loop: the backward branch with the largest span
        loops = []
        for addr, l in ins:
            b = re.search(r"BRA\s+(?:`\(\.L_x_\d+\))?", l)
            t = re.search(r"BRA .*?0x([0-9a-f]+)", l)
            if t and int(t.group(1), 16) < addr:
                loops.append((int(t.group(1), 16), addr))
        body = max((sum(1 for a, _ in ins if lo <= a <= hi) for lo, hi in loops), default=-1)
        print(M, bd, nw, k.__name__, "regs", regs, "spill", spill, "total", len(ins), "loop body", body, flush=True)
