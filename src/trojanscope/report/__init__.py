"""Reports: one self-contained HTML page (figures embedded) for a bench run or a command's results.

``render_run(run_dir)`` writes ``report.html`` for a ``trojanscope bench`` run folder (read through
:func:`trojanscope.report.store.load_run`); ``write_report(path, sections)`` writes one for the
results of ``scan``, ``inspect-data`` or ``filter``. Each kind of result has its
:class:`~trojanscope.report.displays.Display`; the plots live in :mod:`trojanscope.report.plots`
(data URIs for the page) and :mod:`trojanscope.report.files` (PNG files beside a command's output).
"""

from .bench_page import render_run, run_context
from .command_page import filter_section, single_context, write_report
from .displays import DISPLAYS, Display
from .html import render
from .store import CellRecord, RunData, load_run

__all__ = ["DISPLAYS", "CellRecord", "Display", "RunData", "filter_section", "load_run", "render", "render_run",
           "run_context", "single_context", "write_report"]
