"""Developer and CI tools: run from a checkout, never shipped in the wheel nor imported by the runtime."""
