"""Work space of ``HQLinear.from_linear`` (the encoder of one layer), measured in a fresh process.

Issue 11 bounds the conversion at the imports + the quantized output + 2 × the largest float tensor + 0.4 GB:
for the layer in flight, its float tensor (already resident here) and as much again for the encoder, plus the
output. The 0.4 GB is a process's slack; it also covers the encoder's row-block temporaries, which are a
constant (a few blocks of ``codec.core._BLOCK_ELEMS`` / ``nn.linear.SNR_BLOCK_ELEMS`` coordinates) and do not
grow with the weight. So that they cannot hide a per-coordinate regression, the child process shrinks both
block sizes (the output does not depend on them: tests/test_codec_blocks.py) and the test allows only a small
constant for them: peak RSS − RSS before ≤ 2 × the bf16 weight's bytes + the layer's stored bytes + 32 MB.
Before the row-streamed encoder (a float32 copy of the rotated rows, the int32 symbols, the decoded integers
for the SNR) this child measured 135 MB against a bound of 86 MB; now 72-74 MB on one machine and 80.6 MB
once on another of the same kind (pages of the libraries that the first large call touches count in RSS and
differ between CPUs), so the constant is 32 MB and the smallest of up to three fresh processes is compared:
RSS noise only ever adds."""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from hq_diffusion.codec import core
from hq_diffusion.codec.config import CodecConfig
from hq_diffusion.nn import linear as L
core._BLOCK_ELEMS = 1 << 17
L.SNR_BLOCK_ELEMS = 1 << 17
def status(k):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(k))
n, k, lattice = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lin = torch.nn.Linear(k, n, dtype=torch.bfloat16)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    lin.weight.copy_(torch.randn(n, k, generator=g) * torch.exp(0.5 * torch.randn(k, generator=g)) * 0.02)
L.HQLinear.from_linear(torch.nn.Linear(512, 64), CodecConfig(bps=4.0, lattice=lattice), key="warm")
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # VmHWM := VmRSS
before = status('VmRSS')
m = L.HQLinear.from_linear(lin, CodecConfig(bps=4.0, lattice=lattice), key="layer")
print(json.dumps({"work": status('VmHWM') - before, "weight": lin.weight.numel() * 2, "out": m.nbytes}))
"""


def _work(n: int, k: int, lattice: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), lattice], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_from_linear_work_space_within_the_issue_rule():
    for _ in range(3):
        r = _work(1024, 12288, "e8")  # 25 MB of bf16 (the code before the streamed encoder: 135 MB against 86)
        bound = 2 * r["weight"] + r["out"] + 32 * 2**20
        if r["work"] <= bound:
            break
    assert r["work"] <= bound, {k: round(v / 2**20, 1) for k, v in {**r, "bound": bound}.items()}
