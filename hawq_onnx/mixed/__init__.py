"""Mixed-precision allocation: sensitivity tables, cost tables, ties/pins and the exact ILP."""

from hawq_onnx.mixed.ilp import pareto_front, solve
from hawq_onnx.mixed.problem import (
    ActUnit,
    Allocation,
    AllocationProblem,
    AllocationProblemError,
    Budget,
    InfeasibleBudgetError,
    LayerChoice,
)

__all__ = ["ActUnit", "Allocation", "AllocationProblem", "AllocationProblemError", "Budget",
           "InfeasibleBudgetError", "LayerChoice", "pareto_front", "solve"]
