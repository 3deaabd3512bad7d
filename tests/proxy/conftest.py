"""Fixtures of the proxy suite; the machinery lives in harness.py."""
from tests.proxy.harness import aloop, backends, proxy_factory  # noqa: F401
