"""Mirror ops: shape."""
