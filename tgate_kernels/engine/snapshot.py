"""Saving what objects hold in their own ``__dict__`` and putting exactly that back.

T-GATE (and DeepCache, which it drives) install wrappers as instance attributes: a pipeline's
``progress_bar``, a module's ``forward``. Undoing that means restoring the attribute the instance
had before, or removing it when it had none, so the class attribute shows through again. A
snapshot taken before the change is the whole undo: restoring it is idempotent, so an undo that
was interrupted can simply run again.
"""

from __future__ import annotations

from typing import Any, Iterable

_ABSENT = object()


class InstanceAttributes:
    """The instance attribute ``name`` of each of ``objects``, as it is now."""

    def __init__(self, objects: Iterable[Any], name: str) -> None:
        self.name = name
        self._saved = [(obj, obj.__dict__.get(name, _ABSENT)) for obj in objects]

    def restore(self) -> None:
        for obj, value in self._saved:
            if value is _ABSENT:
                obj.__dict__.pop(self.name, None)
            else:
                obj.__dict__[self.name] = value
