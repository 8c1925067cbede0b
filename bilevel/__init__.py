"""Generic bi-level engine: hypergradient estimators, aggregators and the bi-level step."""
