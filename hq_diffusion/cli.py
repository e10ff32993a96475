"""``hq-diffusion`` command line: thin dispatch to the modules that implement each command.

Commands import their implementation lazily so ``hq-diffusion --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command → (module, function, help)
COMMANDS = {
    "demo": ("hq_diffusion.demo", "main", "quantize the embedded tiny LTX pipeline and report (the main job)"),
    "eval": ("hq_diffusion.eval.cli", "main", "bf16 vs quantized evaluation over a prompt suite"),
    "app": ("hq_diffusion.app.server", "main", "Gradio app: bf16 and quantized side by side"),
    "inspect": ("hq_diffusion.bench.inspect", "main", "per-layer weight statistics before/after the RHT, bits and SNR"),
    "quantize": ("hq_diffusion.integrations.convert_cli", "main",
                 "quantize a float diffusers checkpoint on disk, one tensor at a time (bounded memory)"),
    "train-tiny": ("hq_diffusion.tiny.train", "main", "train the tiny LTX pipeline on the procedural clips"),
}
BENCHES = {
    "rd": ("hq_diffusion.bench.rd", "main", "rate–distortion table on iid N(0,1) vs baselines"),
    "speed": ("hq_diffusion.bench.speed", "main", "codec encode/decode throughput on this CPU"),
    "tails": ("hq_diffusion.bench.tails", "main", "heavy-tailed weights: kurtosis and SNR at 4 bps"),
    "kernels": ("hq_diffusion.bench.kernels", "main", "Triton kernel throughput (GPU)"),
    "kv": ("hq_diffusion.bench.kv", "main", "K/V bias-correction variants: bias and attention SNR"),
    "compile": ("hq_diffusion.bench.compile_step", "main", "one tiny-pipeline step: eager vs torch.compile"),
    "e2e": ("hq_diffusion.bench.e2e", "main", "tiny LTX pipeline: hq-diffusion vs a 4-bit peer"),
    "app-load": ("hq_diffusion.bench.app_load", "main", "8 concurrent /generate calls against a local app"),
    "peers": ("hq_diffusion.bench.peers", "main", "installed peer libraries (bnb, HQQ, quanto, torchao, gguf, SDNQ), every bit counted"),
    "convert": ("hq_diffusion.bench.convert", "main", "real-width LTX-2 slice: streaming conversion, RSS and MB/s"),
    "rans-linear": ("hq_diffusion.bench.rans_linear", "main", "HQLinear with Rice vs rANS vs auto: bps, SNR, CPU forward"),
}


def _run(entry, argv):
    module, func, _ = entry
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            print(f"hq-diffusion: this build does not include {module}", file=sys.stderr)
            return 2
        raise
    return getattr(mod, func)(argv) or 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hq-diffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks (" + ", ".join(BENCHES) + ")", add_help=False)
    bench.add_argument("which", nargs="?", choices=sorted(BENCHES))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in COMMANDS:
        return _run(COMMANDS[cmd], rest)
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            print("usage: hq-diffusion bench {" + ",".join(sorted(BENCHES)) + "} [options]", file=sys.stderr)
            for k, (_, _, h) in BENCHES.items():
                print(f"  {k:8s} {h}", file=sys.stderr)
            return 2
        return _run(BENCHES[rest[0]], rest[1:])
    parser.error(f"unknown command {cmd!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
