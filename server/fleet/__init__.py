"""What calls share beyond one process: the registry of live calls, stream tokens, and the
shared state (in memory, or Redis for a fleet)."""
