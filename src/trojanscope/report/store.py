"""The report's reader of a ``trojanscope bench`` run folder: the bench's own typed run store
(:mod:`trojanscope.bench.store`), re-exported here so the report's modules read it from one place.
:func:`load_run` reads a run folder into a :class:`RunData` of frozen :class:`CellRecord` objects.
"""

from __future__ import annotations

from ..bench.store import (KIND_OF_CLASS, KIND_OF_FAMILY, KINDS, CellRecord, RunData, cell_record, kind_of,
                           load_run, natural_key, planted_triggers, read_json, read_tensors, safe_name)

__all__ = ["KINDS", "KIND_OF_CLASS", "KIND_OF_FAMILY", "CellRecord", "RunData", "cell_record", "kind_of", "load_run",
           "natural_key", "planted_triggers", "read_json", "read_tensors", "safe_name"]
