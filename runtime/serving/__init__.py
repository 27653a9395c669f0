"""Serving: the step-level batching engine (the one place serving logic lives), and thin HTTP / Ray Serve
layers that only translate requests into it. The HTTP and Ray parts need the `serve` extra."""
