"""Old module paths (before the ``core`` / ``families`` / ``measure`` / ``io`` / ``data`` layout) keep working.

``import tpsvit.trace`` or ``from tpsvit.loading import load_model`` gives the module at its new path (the same module
object, so a monkeypatch on either name reaches the code), with a :class:`DeprecationWarning` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "tpsvit.methods": "tpsvit.core.methods",
    "tpsvit.config": "tpsvit.core.config",
    "tpsvit.scoring": "tpsvit.core.scoring",
    "tpsvit.squeeze": "tpsvit.core.squeeze",
    "tpsvit.reducers": "tpsvit.core.reducers",
    "tpsvit.trace": "tpsvit.core.trace",
    "tpsvit.flops": "tpsvit.measure.flops",
    "tpsvit.bench": "tpsvit.measure.bench",
    "tpsvit.evaluation": "tpsvit.measure.evaluation",
    "tpsvit.budget": "tpsvit.measure.budget",
    "tpsvit.plan": "tpsvit.measure.plan",
    "tpsvit.atomic": "tpsvit.io.atomic",
    "tpsvit.loading": "tpsvit.io.loading",
    "tpsvit.hf_loading": "tpsvit.io.hf_loading",
    "tpsvit.assets": "tpsvit.io.assets",
    "tpsvit.models": "tpsvit.io.models",
    "tpsvit.export": "tpsvit.io.export",
    "tpsvit.cluttered": "tpsvit.data.cluttered",
    "tpsvit.hf": "tpsvit.families.hf_common",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.target}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module):
        """The target module ran already."""


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds an old tpsvit module path and hands back the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())
