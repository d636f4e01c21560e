"""MLProxy ext_proc service: Envoy external processing that batches inference requests."""
