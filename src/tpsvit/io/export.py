"""Deploy a patched model: ONNX export (``torch.onnx`` dynamo exporter), checked once in onnxruntime.

What works, for all five methods (etps, dtps, evit, dynamicvit, tome) in **eval mode**, on plain, distilled and
register-token timm ViTs (tests/test_export.py; torch 2.14):

* ``torch.compile(model, fullgraph=True)``: no graph breaks, matches eager within 1e-6 (inductor and aot_eager);
  ``dynamic=True`` works too.
* ``torch.export.export(model, (x,))``: its program matches eager exactly; a dynamic batch dimension works
  (``dynamic_shapes=({0: torch.export.Dim("batch")},)``).
* ONNX via :func:`export_onnx` (``torch.onnx.export(..., dynamo=True)``), fixed or dynamic batch; onnxruntime matches
  PyTorch within about 1e-7 on the tiny test models.

What is fixed at export time: the **image size** (hence every token count: ``kept = ceil(keep_rate * n)`` is worked
out from the input shape while tracing) and the patch itself (method, keep rates, locations, ToMe's r). To change
either, export again. Training mode is not exported (dTPS's Gumbel sampling and the masked training path are for
fine-tuning); :func:`export_onnx` puts the model in eval mode for the export and restores its mode afterwards.

Needs the optional extra: ``pip install 'tps-vit[export]'`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from tpsvit.errors import ExportError, InvalidArgumentError, MissingDependencyError
from tpsvit.families import logits_of
from tpsvit.io.atomic import check_writable as writable

INSTALL_HINT = "pip install 'tps-vit[export]'  (or: pip install onnx onnxruntime onnxscript)"
DEFAULT_ATOL = 1e-3
METADATA_PREFIX = "tpsvit."


def require_export_dependencies() -> None:
    """Raise :class:`MissingDependencyError` with the install command when onnx, onnxruntime or onnxscript is
    missing."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependencyError(f"ONNX export needs {', '.join(missing)}, which {verb} not installed; install "
                                     f"with: {INSTALL_HINT}")


def onnx_metadata(model: nn.Module, model_name: str | None = None, extra: dict | None = None) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file: the patch (JSON of :func:`tpsvit.io.loading.patch_spec`,
    ``null`` when unpatched), the model name and the tpsvit version, plus ``extra`` (values JSON-encoded unless
    strings)."""
    from tpsvit import __version__
    from tpsvit.io.loading import patch_spec

    props = {
        f"{METADATA_PREFIX}patch": json.dumps(patch_spec(model)),
        f"{METADATA_PREFIX}model": model_name or type(model).__name__,
        f"{METADATA_PREFIX}version": __version__,
    }
    for key, value in (extra or {}).items():
        props[f"{METADATA_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return props


def check_writable(path: Path) -> None:
    """Raise :class:`InvalidArgumentError` when ``path`` is a folder or its folder cannot be written."""
    writable(path, example="model.onnx")


def _check_count(name: str, value, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def export_onnx(model: nn.Module, path: str | os.PathLike, batch_size: int = 1, dynamic_batch: bool = False,
                img_size=None, in_chans: int | None = None, model_name: str | None = None,
                metadata: dict | None = None, opset_version: int | None = None, check: bool = True,
                atol: float = DEFAULT_ATOL, seed: int = 0) -> dict:
    """Write ``model`` (patched or not) to an ONNX file and check it once in onnxruntime.

    Args:
        model: a timm ViT, patched with :func:`tpsvit.patch` or not. Exported in eval mode (its mode is restored).
        path: the ``.onnx`` file to write (atomically; missing folders are created).
        batch_size: the batch of the example input (the fixed batch of the file unless ``dynamic_batch``).
        dynamic_batch: make the batch dimension dynamic (input ``images`` of shape ``(batch, C, H, W)``).
        img_size, in_chans: input size; default the model's (:func:`tpsvit.measure.bench.input_size`). Fixed in
            the file.
        model_name: recorded in the metadata (default: the model's class name).
        metadata: more ``metadata_props`` (keys get the ``tpsvit.`` prefix).
        opset_version: ONNX opset (default: the exporter's).
        check: run the file once in onnxruntime on random input and compare with the PyTorch logits.
        atol: largest allowed max-abs difference of the logits; above it :class:`ExportError` is raised (the file
            stays written, for inspection).
        seed: seed of the random check input.

    Returns a dict: ``path``, ``input_shape`` (``"batch"`` for a dynamic batch), ``metadata`` and, when checked,
    ``max_abs_diff`` and ``check_batch_size``.

    Raises :class:`MissingDependencyError` without onnx/onnxruntime/onnxscript, :class:`InvalidArgumentError` for bad
    arguments or an unwritable path, :class:`ExportError` when the export fails or the check does not match.
    """
    from tpsvit.io.atomic import atomic_write
    from tpsvit.measure.bench import input_size

    require_export_dependencies()
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"expected a torch model, got {type(model).__name__}")
    _check_count("batch_size", batch_size)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (math.isfinite(atol) and atol >= 0):
        raise InvalidArgumentError(f"atol must be a finite number >= 0, got {atol!r}")
    path = Path(path)
    check_writable(path)
    chans, h, w = input_size(model, img_size, in_chans)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, chans, h, w, generator=generator).to(device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    props = onnx_metadata(model, model_name, {
        "input_shape": ["batch" if dynamic_batch else batch_size, chans, h, w], **(metadata or {})})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(x)
            exported = model if isinstance(output, torch.Tensor) else _Logits(model)  # transformers: a ModelOutput
            reference = logits_of(output).float().cpu().numpy()
            program = _onnx_program(exported, x, dynamic_shapes, opset_version)
        for key, value in props.items():
            program.model.metadata_props[key] = value
        atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    finally:
        model.train(was_training)
    result = {"path": str(path), "input_shape": ["batch" if dynamic_batch else batch_size, chans, h, w],
              "metadata": props}
    if check:
        output = run_onnx(path, x.cpu().numpy())
        diff = float(abs(output - reference).max())
        result.update(max_abs_diff=diff, check_batch_size=batch_size)
        if not diff <= atol:  # also catches NaN
            raise ExportError(f"wrote {path}, but onnxruntime's logits differ from PyTorch's by {diff:.3g} "
                              f"(allowed: {atol:g})")
    return result


class _Logits(nn.Module):
    """A transformers classifier as the ONNX file sees it: images in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))


def _onnx_program(model: nn.Module, x: torch.Tensor, dynamic_shapes, opset_version):
    """``torch.onnx.export(dynamo=True)`` with its progress chatter and warnings kept off the console (shown
    only if it fails)."""
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            return torch.onnx.export(model, (x,), dynamo=True, input_names=["images"], output_names=["logits"],
                                     dynamic_shapes=dynamic_shapes, opset_version=opset_version, verbose=False,
                                     external_data=False)
    except Exception as err:
        log = chatter.getvalue().strip().splitlines()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {first}"
                          + (f" (last exporter line: {log[-1]})" if log else "")) from err


def run_onnx(path: str | os.PathLike, images):
    """Logits of an ONNX file on ``images`` (a numpy array or CPU tensor) with onnxruntime's CPU provider."""
    require_export_dependencies()
    import numpy as np
    import onnxruntime as ort

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(images, dtype=np.float32)})[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as a dict."""
    require_export_dependencies()
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}
