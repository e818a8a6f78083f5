"""tpsvit: Joint Token Pruning & Squeezing (TPS, CVPR 2023) and token-reduction baselines for timm ViTs.

The public API is imported on first use (``tpsvit.patch``, ``tpsvit.gmacs``, ...), so that ``import tpsvit.cli`` and
``tpsvit --help`` do not pay for importing torch and timm. The demo ViTs are registered with timm at import when timm
is already imported (``import timm, tpsvit``), else when the API is first used.
"""

import sys
import types

from tpsvit._moved import install as _install_moved_paths
from tpsvit.errors import (
    CheckpointError,
    DatasetError,
    ExportError,
    InvalidArgumentError,
    MissingDependencyError,
    TPSError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
_install_moved_paths()  # old module paths (tpsvit.trace, tpsvit.loading, ...) give the moved modules

# public name -> module that defines it (imported together on first use of any of them)
_API = {
    "benchmark": "tpsvit.measure.bench",
    "TPSConfig": "tpsvit.core.config",
    "gmacs": "tpsvit.measure.flops",
    "METHODS": "tpsvit.core.methods",
    "ForwardState": "tpsvit.patch",
    "forward_state": "tpsvit.patch",
    "is_patched": "tpsvit.patch",
    "patch": "tpsvit.patch",
    "set_keep_rate": "tpsvit.patch",
    "tracing": "tpsvit.patch",
    "unpatch": "tpsvit.patch",
    "Schedule": "tpsvit.measure.plan",
    "plan": "tpsvit.measure.plan",
    "squeeze": "tpsvit.core.squeeze",
    "squeeze_masked": "tpsvit.core.squeeze",
    "LocationTrace": "tpsvit.core.trace",
    "Trace": "tpsvit.core.trace",
    "restore": "tpsvit.core.trace",
}
# imported only when asked for: matplotlib for token maps, onnx for export
_ON_DEMAND = {"visualize": "tpsvit.viz", "export_onnx": "tpsvit.io.export", "load_model": "tpsvit.io.loading"}
_loading = False


def _load_api() -> None:
    """Import the API modules and bind their names here. Binding after the imports matters: the functions
    ``patch``, ``plan`` and ``squeeze`` share their names with submodules, which an import would bind instead."""
    global _loading
    if _loading:
        return
    _loading = True
    try:
        import importlib

        import tpsvit.io.models  # noqa: F401  (registers the demo ViTs with timm)

        modules = {name: importlib.import_module(name) for name in set(_API.values())}
        package = sys.modules[__name__]
        for attr, module in _API.items():
            package.__dict__[attr] = getattr(modules[module], attr)
    finally:
        _loading = False


class _Package(types.ModuleType):
    def __getattribute__(self, name: str):
        if name in _API:
            value = super().__getattribute__("__dict__").get(name)
            if value is None or isinstance(value, types.ModuleType):
                _load_api()
        return super().__getattribute__(name)

    def __getattr__(self, name: str):
        if name in _ON_DEMAND:
            import importlib

            return getattr(importlib.import_module(_ON_DEMAND[name]), name)
        raise AttributeError(f"module 'tpsvit' has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
if "timm" in sys.modules:
    _load_api()


__all__ = [
    "METHODS",
    "CheckpointError",
    "DatasetError",
    "ExportError",
    "ForwardState",
    "InvalidArgumentError",
    "LocationTrace",
    "MissingDependencyError",
    "Schedule",
    "TPSConfig",
    "TPSError",
    "Trace",
    "UnsupportedModelError",
    "benchmark",
    "export_onnx",
    "forward_state",
    "gmacs",
    "is_patched",
    "load_model",
    "patch",
    "plan",
    "restore",
    "set_keep_rate",
    "squeeze",
    "squeeze_masked",
    "tracing",
    "unpatch",
    "visualize",
]
