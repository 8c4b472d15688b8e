"""Mirror ops: logic."""
