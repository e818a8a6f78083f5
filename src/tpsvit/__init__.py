"""tpsvit: Joint Token Pruning & Squeezing (TPS, CVPR 2023) and token-reduction baselines for timm ViTs."""

import tpsvit.models  # noqa: F401  (registers the demo ViTs with timm)
from tpsvit.bench import benchmark
from tpsvit.config import TPSConfig
from tpsvit.errors import (
    CheckpointError,
    DatasetError,
    ExportError,
    InvalidArgumentError,
    MissingDependencyError,
    TPSError,
    UnsupportedModelError,
)
from tpsvit.flops import gmacs
from tpsvit.methods import METHODS
from tpsvit.patch import ForwardState, forward_state, is_patched, patch, set_keep_rate, tracing, unpatch
from tpsvit.plan import Schedule, plan
from tpsvit.squeeze import squeeze, squeeze_masked
from tpsvit.trace import LocationTrace, Trace, restore

__version__ = "0.1.0"


def __getattr__(name: str):
    # matplotlib is imported only when token maps are asked for, onnx only when exporting
    if name == "visualize":
        from tpsvit.viz import visualize

        return visualize
    if name == "load_model":
        from tpsvit.loading import load_model

        return load_model
    if name == "export_onnx":
        from tpsvit.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'tpsvit' has no attribute {name!r}")


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
