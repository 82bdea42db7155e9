"""The equilibrium analysis of ReSTE: indicators, sweeps of training runs, and reports.

- :mod:`reste.analysis.indicators`: :class:`IndicatorTracker` (estimating error, gradient
  instability, flip ratio, histogram snapshots) and :func:`reference_aggregates`;
- :mod:`reste.analysis.sweep`: :class:`Sweep`, grids of ``reste train`` runs (``reste sweep``);
- :mod:`reste.analysis.report`: :func:`build_report`, the seed's tables and figures (``reste report``);
  its parts: :mod:`~reste.analysis.runs` (reading runs), :mod:`~reste.analysis.cells` (runs grouped
  over seeds), :mod:`~reste.analysis.tables`, :mod:`~reste.analysis.figures`, :mod:`~reste.analysis.markdown`;
- :mod:`reste.analysis.cost`: what the indicators cost next to a train step.

See docs/analysis.md.
"""

from .indicators import IndicatorTracker, load_snapshot, read_metrics, reference_aggregates
from .report import NotARunError, build_report
from .sweep import Sweep, SweepError

__all__ = [
    "IndicatorTracker",
    "NotARunError",
    "Sweep",
    "SweepError",
    "build_report",
    "load_snapshot",
    "read_metrics",
    "reference_aggregates",
]
