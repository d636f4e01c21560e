"""Red-team probes of a running stack (issue 12)."""
