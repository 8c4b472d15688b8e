"""Mirror ops: normalization."""
