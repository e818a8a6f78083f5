"""Exceptions for bad user input. Each is also a ValueError or TypeError, so callers may catch either."""


class TPSError(Exception):
    """Base of every error caused by the user's input (the CLI prints these on one line)."""


class InvalidArgumentError(TPSError, ValueError):
    """An argument outside what is allowed (keep rate, location, method name, recipe key, ...)."""


class UnsupportedModelError(TPSError, TypeError):
    """A model that tpsvit cannot patch, or a method the model cannot run (e.g. no class token)."""


class DatasetError(TPSError, ValueError):
    """A dataset path that is missing, empty, malformed or unreadable."""


class CheckpointError(TPSError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class ExportError(TPSError, RuntimeError):
    """An export that failed, or whose file does not reproduce the PyTorch model (ONNX logits off by more than the
    tolerance)."""


class MissingDependencyError(TPSError, ImportError):
    """An optional dependency that a feature needs is not installed (the message says how to install it)."""
