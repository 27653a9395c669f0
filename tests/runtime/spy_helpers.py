"""A backend wrapper for tests that prove bad input fails before any component runs."""
from __future__ import annotations


class BackendSpy:
    """Wraps a backend; counts component calls (bad input must fail before any)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, component, feeds):
        self.calls.append(component)
        return self.backend.run(component, feeds)
