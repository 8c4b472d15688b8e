"""Mirror ops: reduce."""
