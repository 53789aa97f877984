"""Reports: one self-contained HTML page (figures embedded) for a bench run or a command's results.

``render_run(run_dir)`` writes ``report.html`` for a ``trojanscope bench`` run folder;
``write_report(path, sections)`` writes one for the results of ``scan``, ``inspect-data`` or
``filter``. Plots live in :mod:`trojanscope.report.plots` and take results as input.
"""

from .html import filter_section, render, render_run, run_context, single_context, write_report

__all__ = ["filter_section", "render", "render_run", "run_context", "single_context", "write_report"]
