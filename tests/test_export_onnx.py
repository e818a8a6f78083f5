"""ONNX export of patched models (tpsvit.export_onnx) and `tpsvit export` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import VARIANTS, tiny_vit

import tpsvit
from tpsvit.cli import main
from tpsvit.io.loading import save_checkpoint

pytest.importorskip("onnxruntime", reason="needs the export extra: pip install 'tps-vit[export]'")
pytest.importorskip("onnxscript", reason="needs the export extra: pip install 'tps-vit[export]'")

from tpsvit.io import export  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)


def _patched(method: str, kind: str):
    model = tiny_vit(depth=2, **VARIANTS[kind])
    kwargs = {"r": 8, "locations": (0, 1)} if method == "tome" else {"keep_rate": 0.5, "locations": (0, 1)}
    return tpsvit.patch(model, method, **kwargs)


@pytest.mark.parametrize(("method", "kind", "dynamic"), [
    ("etps", "registers", True), ("dtps", "plain", False), ("evit", "distilled", False),
    ("dynamicvit", "plain", False), ("tome", "registers", True)])
def test_export_onnx_matches_pytorch_and_records_the_patch(tmp_path, method, kind, dynamic):
    model = _patched(method, kind).train()
    path = tmp_path / "sub" / "m.onnx"
    result = tpsvit.export_onnx(model, path, batch_size=2, dynamic_batch=dynamic, model_name="tiny")
    assert model.training  # mode restored
    assert result["max_abs_diff"] <= 1e-4 and path.is_file()
    assert result["input_shape"] == ["batch" if dynamic else 2, 3, 32, 32]
    meta = export.read_metadata(path)
    assert json.loads(meta["tpsvit.patch"]) == tpsvit.io.loading.patch_spec(model)
    assert meta["tpsvit.model"] == "tiny" and meta["tpsvit.version"] == tpsvit.__version__
    for n in ((3, 1) if dynamic else (2,)):
        torch.manual_seed(n)
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        assert abs(export.run_onnx(path, x) - expected).max() < 1e-4


def test_mismatch_is_an_export_error_and_bad_arguments_are_clear(tmp_path, monkeypatch):
    model = _patched("etps", "plain")
    with pytest.raises(tpsvit.InvalidArgumentError, match="batch_size"):
        tpsvit.export_onnx(model, tmp_path / "m.onnx", batch_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(tpsvit.InvalidArgumentError, match="not writable"):
        tpsvit.export_onnx(model, tmp_path / "file" / "m.onnx")
    monkeypatch.setattr(export, "run_onnx", lambda path, images: model(torch.as_tensor(images)).detach().numpy() + 0.5)
    with pytest.raises(tpsvit.ExportError, match=r"differ from PyTorch's by 0\.5"):
        tpsvit.export_onnx(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").is_file()  # kept for inspection


def test_missing_onnx_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(tpsvit.MissingDependencyError, match=r"onnxruntime.*pip install 'tps-vit\[export\]'"):
        tpsvit.export_onnx(_patched("etps", "plain"), tmp_path / "m.onnx")
    assert main(["export", "--model", "vit_tiny_patch16_224", "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'tps-vit[export]'" in err


def test_import_tpsvit_does_not_import_onnx():
    code = "import sys, tpsvit; print(sorted({'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
    assert tpsvit.export_onnx is export.export_onnx and "export_onnx" in tpsvit.__all__


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = tpsvit.io.loading.create_model("vit_tiny_patch16_224", **TINY)
    return str(save_checkpoint(model, tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY))


def test_cli_export_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    argv = ["export", "--checkpoint", tiny_checkpoint, "--method", "etps", "--keep-rate", "0.5", "--locations", "1",
            "2", "--onnx", str(out), "--batch-size", "2", "--dynamic-batch", "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "input batchx3x32x32" in text and "max |difference|" in text
    diff = float(text.split("max |difference| ")[1].split()[0])
    assert diff <= 1e-3
    meta = export.read_metadata(out)
    assert json.loads(meta["tpsvit.patch"])["keep_rate"] == [0.5, 0.5]
    assert json.loads(meta["tpsvit.patch"])["locations"] == [1, 2]
    assert meta["tpsvit.model"] == "vit_tiny_patch16_224" and meta["tpsvit.checkpoint"] == tiny_checkpoint


@pytest.mark.parametrize(("extra", "message"), [
    (["--keep-rate", "1.5"], "keep_rate"),
    (["--r", "4"], "--r is ToMe's"),
    (["--onnx", "{tmp}/file/m.onnx"], "not writable"),
    (["--onnx", "{tmp}"], "is a directory"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cli_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys, extra, message, monkeypatch):
    import tpsvit.io.assets

    monkeypatch.setattr(tpsvit.io.assets, "demo_checkpoint", lambda *a, **k: tiny_checkpoint)  # the default model
    (tmp_path / "file").write_text("x")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    onnx = [] if "--onnx" in extra else ["--onnx", str(tmp_path / "m.onnx")]
    assert main(["export", "--method", "etps", "--locations", "1", "2", *onnx, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_needs_onnx(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--method", "etps"])
    assert exit_info.value.code == 2 and "--onnx" in capsys.readouterr().err
