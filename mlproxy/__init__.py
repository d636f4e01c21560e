"""MLProxy: SLA-aware batching for ML inference behind Envoy."""

__version__ = "0.1.0"
