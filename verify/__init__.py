"""k3trt.verify: proof that the artifacts compute what the PyTorch reference computes: the torch reference
backend, parity reports, benchmarks, FLOP counting, load tests and the measured experiments."""
