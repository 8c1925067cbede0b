"""Generic bi-level engine: hypergradient estimators, aggregators and the bi-level step.

Imports only torch (and ``higher`` lazily): the engine knows nothing about images, so the same code serves any
upper/lower pair. See ``bilevel.estimators``, ``bilevel.aggregate`` and ``bilevel.step`` for the formulas, and
``bilevel.convgrad`` for why the second-order estimators run convolutions with their own backward pass.
"""

from .aggregate import Aggregator, aggregate, create_aggregator, list_aggregators
from .estimators import hypergrad, list_hypergrads
from .step import BilevelStep, Constraint, UpperOutput

__all__ = [
    "Aggregator",
    "BilevelStep",
    "Constraint",
    "UpperOutput",
    "aggregate",
    "create_aggregator",
    "hypergrad",
    "list_aggregators",
    "list_hypergrads",
]
