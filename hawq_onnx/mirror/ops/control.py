"""Mirror ops: control."""
