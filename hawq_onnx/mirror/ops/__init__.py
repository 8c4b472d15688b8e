"""Op implementations for the mirror, grouped by family; importing registers them all."""

from hawq_onnx.mirror.ops import (  # noqa: F401
    activations,
    control,
    elementwise,
    logic,
    nn,
    normalization,
    reduce,
    rnn,
    shape,
)
