"""Mirror ops: rnn."""
