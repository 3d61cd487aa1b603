"""Strategies: what to try next, through ask/tell (grid here, Optuna samplers in ``.optuna``).

``make_strategy(spec)`` builds the one a spec names; Optuna is imported only when it is needed.
"""

from servetune.core.strategies.base import Strategy, Suggestion, make_strategy
from servetune.core.strategies.grid import GridStrategy

__all__ = ["GridStrategy", "Strategy", "Suggestion", "make_strategy"]
