"""k3trt.cli: the `k3trt` command line: one module per command group, shared argument helpers, and the error
boundary. Modules import their stage's work inside the command, after the arguments are checked."""
