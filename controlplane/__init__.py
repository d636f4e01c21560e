"""MLProxy control plane: SLA policies in Redis, pushed to every ext_proc replica."""
