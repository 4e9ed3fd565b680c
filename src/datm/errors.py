"""One base for every expected failure of datm (bad input, missing artifacts, unmet requirements).

The CLI turns a `DatmError` into ``datm: error: ...`` with exit code 2; anything else is a bug and
keeps its traceback. Each stage raises its own subclass, with a message naming the file, line or key
and what was expected. Subclasses also derive from ValueError, which callers caught before this base
existed.
"""

from __future__ import annotations


class DatmError(ValueError):
    """An expected failure whose message tells the user what to fix."""
