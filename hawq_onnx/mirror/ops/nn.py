"""Mirror ops: nn."""
