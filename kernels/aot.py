"""Ahead-of-time compilation of every Triton kernel for a real GPU target, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not that they compile: the
interpreter accepts programs the GPU compiler rejects (dot shapes, layouts, casts), and it says nothing of
registers, spills or shared memory. This module runs Triton's real pipeline (TTIR → TTGIR → LLVM IR → PTX →
``ptxas`` → cubin) for an NVIDIA architecture (sm_90 = H100/H200 by default), using the ``ptxas`` and
``cuobjdump`` shipped inside the Triton wheel, for exactly the launches the package makes:

1. *Record.* Each launcher of :mod:`.rice_decode`, :mod:`.rans_decode`, :mod:`.rotate`, :mod:`.int8_gemm` and :mod:`.fused` runs
   on small CPU inputs with its kernel object swapped for a recorder, so the arguments and compile-time
   constants are the ones the CUDA code path passes (tile sizes, modes, lattices), not a hand-written copy.
2. *Compile.* Triton's own argument binder specialises the recorded arguments for the target (pointer
   alignment, divisibility by 16), then ``triton.compile`` builds the cubin. Autotuned kernels are compiled
   for every configuration their autotuner would try on that architecture.
3. *Inspect.* ``cuobjdump -res-usage`` gives registers, local memory (spills) and static shared memory; the
   compiler's metadata gives the dynamic shared memory; the PTX says which tensor-core instructions
   (``mma`` / ``wgmma`` and their operand types) the matrix products became.

This proves the kernels build for the target and fit its limits; it measures no speed (that is
``hq-diffusion bench kernels`` on a GPU). It relies on Triton internals (``create_function_from_signature``,
``JITFunction._pack_args``) of the Triton version pinned through torch; another version fails with a clear
error instead of a wrong answer.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

#: Per-block limits of the NVIDIA architectures we target: (max dynamic shared memory in bytes, registers).
LIMITS = {80: (166912, 65536), 86: (101376, 65536), 89: (101376, 65536), 90: (232448, 65536)}
ARCH_NAMES = {80: "A100", 86: "RTX 30xx", 89: "L40S / RTX 40xx", 90: "H100 / H200"}


class AOTUnavailable(RuntimeError):
    """Triton, its NVIDIA backend or the internals this check uses are missing or of another version."""


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its positional and keyword arguments, and (for an
    autotuned kernel) the configurations its autotuner would try."""

    kernel: str
    variant: str
    fn: Any
    args: tuple
    kwargs: dict
    configs: list = field(default_factory=list)
    select: Callable[[int], list] | None = None  # the autotuner's configurations for sm_<arch>


@dataclass
class Compiled:
    """What compiling one launch (one autotune configuration) for one architecture gave.

    regs: registers per thread; local: bytes of local memory per thread (register spills and stack);
    shared: bytes of shared memory per block (static + dynamic); mma: distinct tensor-core instructions."""

    kernel: str
    variant: str
    config: str
    arch: int
    num_warps: int
    regs: int
    local: int
    shared: int
    mma: tuple[str, ...]
    ok: bool
    problem: str = ""
    fma32: int = 0  # float32 multiply-adds in the PTX (contracted a·b + c rounds once, not twice)

    def row(self) -> dict:
        d = asdict(self)
        d["mma"] = " ".join(self.mma) or "—"
        return d


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel (``kernel[grid](...)``) or an autotuner and records the call."""

    def __init__(self, name: str, real: Any, sink: list, variant: Callable[[], str]):
        self.name, self.real, self.sink, self.variant = name, real, sink, variant

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            fn, configs, select = self.real, [], None
            if hasattr(self.real, "configs") and hasattr(self.real, "fn"):  # triton.autotune
                fn = self.real.fn
                nargs = dict(zip(fn.arg_names, args))
                configs = list(self.real.configs)
                by_arch = getattr(self.real, "select_for_arch", None)
                if by_arch is not None:
                    def select(arch, by_arch=by_arch, nargs=nargs):
                        return by_arch(nargs, arch)
            self.sink.append(Launch(self.name, self.variant(), fn, args, kwargs, configs, select))
        return call


@contextmanager
def _recording(sink: list, variant: Callable[[], str]) -> Iterator[None]:
    from . import fused, int8_gemm, rans_decode, rice_decode, rotate

    targets = [(rice_decode, "_rice_decode_kernel"), (rans_decode, "_rans_decode_kernel"), (rotate, "_rht_kernel"), (rotate, "_rht_quant_kernel"),
               (int8_gemm, "_int8_gemm_tuned"), (fused, "_fused_decode_gemm_kernel")]
    saved = [(m, n, getattr(m, n)) for m, n in targets]
    try:
        for m, n, real in saved:
            setattr(m, n, _Recorder(n.strip("_").removesuffix("_tuned").removesuffix("_kernel"), real, sink,
                                    variant))
        yield
    finally:
        for m, n, real in saved:
            setattr(m, n, real)


def record_launches(full: bool = True) -> list[Launch]:
    """The launches the package makes, recorded from the launchers on small CPU inputs.

    full: every lattice, output, escape and bias variant; otherwise one launch of each kernel."""
    from hq_diffusion.codec import CodecConfig, encode

    from . import _jit, fused, int8_gemm, rans_decode, rice_decode, rotate

    if _jit.LOADED_INTERPRETED:
        raise AOTUnavailable("the kernels were imported in interpreter mode (TRITON_INTERPRET=1); "
                             "run the ahead-of-time check in a process without it")
    sink: list[Launch] = []
    label = {"v": ""}
    g = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int, spikes: bool = False) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=g)
        if spikes:  # outliers large enough that some Rice quotients escape
            w[::7, ::13] *= 4000.0
        return w

    lattices = ("e8", "d4", "a2", "z") if full else ("e8",)
    with _recording(sink, lambda: label["v"]):
        for lat in lattices:
            q = encode(weight(64, 1024), CodecConfig(bps=4.0, lattice=lat), key="aot")
            label["v"] = f"{lat} codes"
            rice_decode.decode_launch(q, "codes")
            if full or lat == "e8":
                label["v"] = f"{lat} rotated bf16"
                rice_decode.decode_launch(q, "rotated", torch.bfloat16)
        if full:
            q = encode(weight(64, 1024, spikes=True), CodecConfig(bps=4.0, lattice="e8"), key="aot")
            label["v"] = "e8 codes, escapes"
            rice_decode.decode_launch(q, "codes")
        for lat in (("e8", "d4") if full else ("e8",)):
            q = encode(weight(64, 1024), CodecConfig(bps=4.0, lattice=lat, coder="rans", block=64), key="aot")
            label["v"] = f"{lat} rANS codes"
            _record_rans(rans_decode, q)
        for dt in ((torch.bfloat16, torch.float32) if full else (torch.bfloat16,)):
            for tile in ((256, 2048, 64) if full else (256,)):
                x = torch.randn(256, 2048, generator=g).to(dt)
                label["v"] = f"{str(dt).removeprefix('torch.')} tile {tile}"
                rotate.rht_launch(x, 0, "aot", tile)
                label["v"] = f"{str(dt).removeprefix('torch.')} tile {tile} + int8"
                rotate.rht_quant_int8_launch(x, 0, "aot", tile, 2048)
        xq = torch.randint(-127, 128, (4096, 2048), dtype=torch.int8, generator=g)
        wq = torch.randint(-127, 128, (2048, 2048), dtype=torch.int8, generator=g)
        xs, ws = torch.rand(4096, generator=g), torch.rand(2048, generator=g)
        for has_bias in ((True, False) if full else (True,)):
            label["v"] = "bf16 out, bias" if has_bias else "bf16 out"
            int8_gemm.int8_gemm_dequant_launch(xq, xs, wq, ws, torch.zeros(2048, dtype=torch.bfloat16)
                                               if has_bias else None)
        for lat in (("e8", "d4") if full else ("e8",)):
            q = encode(weight(256, 2048), CodecConfig(bps=4.0, lattice=lat), key="aot")
            for m in ((1, 16) if full else (16,)):
                label["v"] = f"{lat}, {m} token{'s' if m > 1 else ''}"
                fused.fused_decode_gemm_launch(xq[:m].contiguous(), xs[:m].contiguous(), q,
                                               torch.zeros(256, dtype=torch.bfloat16))
    return sink


def _record_rans(rans_decode, q) -> None:
    """Record the rANS decoder's launches for ``q``: the launcher's end check needs the kernel's output, which
    a recorder does not write, so its HQFormatError after the (recorded) launch is expected here."""
    from hq_diffusion.codec.errors import HQFormatError
    from hq_diffusion.codec.format import rans_contexts

    for i, st in enumerate(q.streams):
        try:
            rans_decode.symbols_launch(st, rans_contexts(q.lattice, i))
        except HQFormatError:
            pass


def _triton_parts():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.knobs import nvidia as nvidia_knobs
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:  # pragma: no cover - depends on the installed Triton
        raise AOTUnavailable(f"this Triton lacks what the ahead-of-time check uses: {e}") from e
    if not hasattr(JITFunction, "_pack_args"):
        raise AOTUnavailable(f"Triton {triton.__version__} has no JITFunction._pack_args; this check "
                             "follows the Triton pinned by the project's torch")
    return triton, GPUTarget, ASTSource, make_backend, nvidia_knobs, create_function_from_signature


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_FMA32 = re.compile(r"\bfma\.rn\.f32\b")
_MMA = re.compile(r"\b((?:wgmma\.mma_async|mma)\.sync\.aligned\.[\w.]+|wgmma\.mma_async\.[\w.]+)")


def _mma_kinds(ptx: str) -> tuple[str, ...]:
    """Distinct tensor-core instructions in ``ptx``, shortened to opcode + shape + operand types."""
    kinds = set()
    for m in _MMA.finditer(ptx):
        parts = [p for p in m.group(1).split(".") if p not in ("sync", "aligned", "row", "col")]
        kinds.add(".".join(parts))
    return tuple(sorted(kinds))


def _resource_usage(cubin: bytes, cuobjdump: str) -> tuple[int, int, int]:
    """(registers, stack + local bytes, static shared bytes) of the one kernel in ``cubin``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, timeout=120)
    m = _RES.search(res.stdout)
    if res.returncode or not m:
        raise AOTUnavailable(f"cuobjdump could not read the cubin: {res.stderr.strip() or res.stdout[-300:]}")
    reg, stack, shared, local = map(int, m.groups())
    return reg, stack + local, shared


def compile_launch(launch: Launch, arch: int = 90) -> list[Compiled]:
    """Compile ``launch`` (every autotune configuration of it) for ``sm_<arch>``; one :class:`Compiled` each."""
    triton, GPUTarget, ASTSource, make_backend, nvidia_knobs, create_binder = _triton_parts()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_binder(launch.fn.signature, launch.fn.params, backend)
    cuobjdump = nvidia_knobs.cuobjdump.path
    max_shared, max_regs = LIMITS.get(arch, LIMITS[80])
    out = []
    configs = launch.select(arch) if launch.select is not None else launch.configs
    for cfg in (configs or [None]):
        kwargs = dict(launch.kwargs)
        label = "—"
        if cfg is not None:
            kwargs.update(cfg.all_kwargs())
            label = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" s{cfg.num_stages}"
        kwargs.setdefault("debug", False)
        bound, spec, opts = binder(*launch.args, **kwargs)
        opts, sig, consts, attrs = launch.fn._pack_args(backend, kwargs, bound, spec, opts)
        ck = triton.compile(ASTSource(launch.fn, sig, consts, attrs), target=target, options=opts.__dict__)
        regs, local, static_shared = _resource_usage(ck.asm["cubin"], cuobjdump)
        warps = ck.metadata.num_warps
        shared = max(static_shared, ck.metadata.shared)
        problems = []
        if shared > max_shared:
            problems.append(f"shared memory {shared} B > {max_shared} B")
        if regs * 32 * warps > max_regs:
            problems.append(f"{regs} registers × {32 * warps} threads > {max_regs}")
        ptx = ck.asm["ptx"]
        out.append(Compiled(launch.kernel, launch.variant, label, arch, warps, regs, local, shared,
                            _mma_kinds(ptx), not problems, "; ".join(problems), len(_FMA32.findall(ptx))))
    return out


def compile_all(arch: int = 90, full: bool = True, progress: bool = False) -> list[Compiled]:
    """Record every launch (:func:`record_launches`) and compile each for ``sm_<arch>``."""
    launches = record_launches(full)
    if progress:
        from tqdm.auto import tqdm

        launches = tqdm(launches, desc=f"compiling for sm_{arch}", unit="launch")
    return [c for launch in launches for c in compile_launch(launch, arch)]
