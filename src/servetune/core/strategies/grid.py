"""Grid strategy: every grid point of the search space that meets its constraints, in a fixed order.

It learns nothing from results; it only never proposes a point twice, replayed ones included.
"""

from __future__ import annotations

from collections.abc import Iterator

from servetune.core.space import MAX_GRID_POINTS, SearchSpace
from servetune.core.strategies.base import History, HistoryStrategy, Suggestion
from servetune.core.study import Params


class GridStrategy(HistoryStrategy):
    """Walks ``SearchSpace.grid_points()`` in order; ``ask`` gives None once all were proposed.

    Points already in the history (told, replayed, or pending) are skipped, so a resumed grid
    study continues where it stopped. ``n_values`` is the number of objective terms.
    Raises ValueError when a param has no grid (a float without ``step``), or when the full grid
    has more than ``MAX_GRID_POINTS`` points.
    """

    def __init__(self, space: SearchSpace, n_values: int = 1) -> None:
        for name, param in space.params.items():
            try:
                param.grid_count()
            except ValueError as e:
                raise ValueError(f"space.params.{name}: {e}") from e
        size = space.full_grid_count()
        if size > MAX_GRID_POINTS:
            raise ValueError(
                f"space.params: the grid has {size:,} points, more than {MAX_GRID_POINTS:,}; "
                "coarsen the steps or use tpe"
            )
        self._history = History(space=space, n_values=n_values)
        self._points: Iterator[Params] = space.grid_points()

    @property
    def history(self) -> History:
        """What this strategy was told (read-only use)."""
        return self._history

    def ask(self) -> Suggestion | None:
        """The next grid point not tried yet, or None when the grid is exhausted."""
        for point in self._points:
            if not self._history.tried(point):
                return self._history.issue(point)
        return None
