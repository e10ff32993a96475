"""Benchmarks behind `hq-diffusion bench ...` (each module has `main(argv) -> int`)."""
