"""sticky-proxy: Istio's sticky sessions without Istio."""

from __future__ import annotations

__version__ = "0.1.0"
