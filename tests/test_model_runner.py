"""model-runner with models built here: a tiny TorchScript network whose answer is known
(label 1 wherever HU > 0, a 1×1×1 convolution + softmax), the same network as a MONAI bundle
(network_def + state dict), resampling to a model spacing and back, spec errors at config time,
and end to end into Orthanc (SEG + SR valid, SR names the model)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import yaml
from dicomnode_model_runner import ModelRunner, ModelRunnerParams, _resample
from pydantic import ValidationError

from dicomnode.plugin import Context, Inputs, PluginError
from dicomnode.run.inputs import series_input
from dicomnode.simulate import write_ct_series
from tests.helpers import storescu
from tests.test_pipeline import make_node, pipeline_config

SPEC = {"name": "hu-above-zero", "version": "0.1", "window": [-1000, 1000],
        "normalize": "minmax", "patch_size": [16, 32, 32], "overlap": 0.25,
        "output": "softmax",
        "labels": {1: {"label": "Dense", "category": ["85756007", "SCT", "Tissue"],
                       "type": ["85756007", "SCT", "Tissue"]}}}


def network() -> torch.nn.Module:
    """Channel 1 − channel 0 = 200·(x − 0.5): after minmax over [−1000, 1000], x > 0.5 ⇔
    HU > 0, so argmax is label 1 exactly where HU > 0."""
    net = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        net.weight[:] = torch.tensor([-100.0, 100.0]).reshape(2, 1, 1, 1, 1)
        net.bias[:] = torch.tensor([50.0, -50.0])
    return net.eval()


@pytest.fixture
def torchscript(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "model.ts"
    torch.jit.script(network()).save(str(model))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return model, spec


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(
        {"version": "0.1", "name": "hu-above-zero", "task": "segmentation"}))
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": {
        "_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2,
        "kernel_size": 1}}))
    torch.save(network().state_dict(), root / "models" / "model.pt")
    (root / "configs" / "dicomnode.yaml").write_text(yaml.safe_dump(SPEC))
    return root


def ctx(tmp_path: Path) -> Context:
    return Context("job", np, "cpu", tmp_path, logging.getLogger("test"))


def ct(tmp_path: Path) -> tuple[Inputs, np.ndarray]:
    files = write_ct_series(tmp_path / "ct", n=20, size=64, slice_mm=2.0)
    si = series_input([pydicom.dcmread(f) for f in files])
    return Inputs("1", (si,), {}), si.pixels()


def test_torchscript_model_segments_exactly_what_it_computes(tmp_path: Path,
                                                             torchscript: tuple[Path, Path]
                                                             ) -> None:
    model, spec = torchscript
    inputs, hu = ct(tmp_path)
    out = ModelRunner().run(inputs, ModelRunnerParams(model=model, spec=spec), ctx(tmp_path))
    [lm] = out.label_maps
    assert np.array_equal(np.asarray(lm.array) == 1, hu > 0)
    [finding] = out.findings
    g = inputs.primary.geometry
    assert finding.measurements[0].value == pytest.approx(
        float((hu > 0).sum()) * float(np.prod(g.spacing)) / 1000, rel=1e-3)
    assert out.algorithm == ("model-runner:hu-above-zero", "1.0.0/0.1")


def test_onnx_model(tmp_path: Path, torchscript: tuple[Path, Path]) -> None:
    """The same network as an ONNX graph (built with onnx.helper), run by onnxruntime."""
    from onnx import TensorProto, helper, save

    weight = helper.make_tensor("W", TensorProto.FLOAT, [2, 1, 1, 1, 1], [-100.0, 100.0])
    bias = helper.make_tensor("B", TensorProto.FLOAT, [2], [50.0, -50.0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], kernel_shape=[1, 1, 1])], "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "d", "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "d", "h", "w"])],
        initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(tmp_path / "model.onnx"))
    inputs, hu = ct(tmp_path)
    out = ModelRunner().run(inputs, ModelRunnerParams(model=tmp_path / "model.onnx",
                                                      spec=torchscript[1]), ctx(tmp_path))
    assert np.array_equal(np.asarray(out.label_maps[0].array) == 1, hu > 0)


def test_monai_bundle_and_resampling(tmp_path: Path, bundle: Path) -> None:
    inputs, hu = ct(tmp_path)
    out = ModelRunner().run(inputs, ModelRunnerParams(model=bundle), ctx(tmp_path))
    assert np.array_equal(np.asarray(out.label_maps[0].array) == 1, hu > 0)
    # at a coarser model spacing the labels come back onto the source grid, close to exact
    spec = dict(SPEC, spacing_mm=[4.0, 2.0, 2.0])
    (bundle / "configs" / "dicomnode.yaml").write_text(yaml.safe_dump(spec))
    out = ModelRunner().run(inputs, ModelRunnerParams(model=bundle), ctx(tmp_path))
    got = np.asarray(out.label_maps[0].array) == 1
    assert got.shape == hu.shape
    # exactly: threshold of the resampled image, resampled back (nearest)
    factors = tuple(a / b for a, b in zip(inputs.primary.geometry.spacing, (4.0, 2.0, 2.0),
                                          strict=True))
    coarse = (_resample(hu, factors, order=1) > 0).astype(np.uint8)
    back = _resample(coarse, tuple(1 / f for f in factors), order=0, shape=hu.shape)
    assert np.array_equal(got, back == 1)
    want = hu > 0  # noisy (σ 20 HU around 40): the coarse model sees averaged noise
    assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.9


def test_spec_and_model_errors_are_config_errors(tmp_path: Path,
                                                 torchscript: tuple[Path, Path]) -> None:
    model, spec = torchscript
    with pytest.raises(ValidationError, match="does not exist"):
        ModelRunnerParams(model=tmp_path / "nope.ts", spec=spec)
    with pytest.raises(ValidationError, match="spec"):
        ModelRunnerParams(model=model)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(SPEC, output="probabilities")))
    with pytest.raises(ValidationError, match="output"):
        ModelRunnerParams(model=model, spec=bad)
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(yaml.safe_dump(dict(SPEC, labels={2: SPEC["labels"][1]})))  # type: ignore[index]
    inputs, _ = ct(tmp_path)
    with pytest.raises(PluginError, match=r"labels \[1\]"):
        ModelRunner().run(inputs, ModelRunnerParams(model=model, spec=unnamed), ctx(tmp_path))


def test_model_runner_into_orthanc(node_factory, orthanc, tmp_path: Path,  # type: ignore[no-untyped-def]
                                   torchscript: tuple[Path, Path]) -> None:
    model, spec = torchscript
    route = {"name": "own-model", "match": {"Modality": "CT"},
             "pipeline": [{"plugin": "model-runner",
                           "params": {"model": str(model), "spec": str(spec)}}],
             "send_to": ["pacs"]}
    cfg = pipeline_config(orthanc, [route])
    cfg["assemble"] = {"quiet_seconds": 1}
    node = make_node(node_factory, cfg)
    files = write_ct_series(tmp_path / "ct", n=12, size=48)
    storescu(node.port, files)
    paths = orthanc.valid_results({"SEG", "SR"}, tmp_path, timeout=90)
    seg = hd.seg.segread(paths["SEG"])
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "model-runner:hu-above-zero"
    assert "hu-above-zero" in str(hd.sr.srread(paths["SR"]))
