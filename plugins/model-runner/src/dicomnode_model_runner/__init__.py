"""``model-runner``: run a hospital's own segmentation model without writing code.

Give it a model — a TorchScript file (``.pt``/``.ts``), an ONNX file (``.onnx``, needs
``onnxruntime``) or a MONAI bundle directory — and a YAML spec that says how to feed it and what
its labels mean. It resamples the series to the model's spacing, windows and normalises,
runs MONAI's sliding-window inference on the job's GPU (or the CPU), maps the labels back onto
the source grid and reports a SEG plus a TID 1500 SR with each label's volume. The SR and SEG
name the model and its version (``<plugin>:<model>``), not just this plugin.

Spec (YAML; for a bundle, default ``<bundle>/configs/dicomnode.yaml``)::

    name: body-seg            # model name, recorded in SR/SEG
    version: "1.0"
    spacing_mm: [2.0, 2.0, 2.0]   # (slice, row, column) the model expects; omit: native
    window: [-1000, 1000]     # HU clipped to this range …
    normalize: minmax         # … then minmax → [0, 1], zscore, or none
    patch_size: [64, 64, 64]
    overlap: 0.25
    output: softmax           # softmax (argmax over channels), sigmoid (> 0.5 per channel,
                              # channel k → label k+1), or labels (the model returns labels)
    labels:
      1: {label: Body, category: [123037004, SCT, Anatomical Structure],
          type: [38266002, SCT, Entire body]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicomnode.plugin import (
    GPU,
    VOLUME,
    Accepts,
    Code,
    Context,
    Finding,
    Inputs,
    LabelMap,
    Measurement,
    Needs,
    Outputs,
    Params,
    Plugin,
    PluginError,
    Segment,
    SeriesInput,
    to_numpy,
)


class LabelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    category: tuple[str, str, str]
    type: tuple[str, str, str]


class ModelSpec(BaseModel):
    """What the model expects and what its output means (validated when the route loads)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    version: str = "1"
    spacing_mm: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    normalize: Literal["minmax", "zscore", "none"] = "minmax"
    patch_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = Field(0.25, ge=0, lt=1)
    output: Literal["softmax", "sigmoid", "labels"] = "softmax"
    labels: dict[int, LabelSpec] = Field(min_length=1)

    @field_validator("labels")
    @classmethod
    def _positive(cls, v: dict[int, LabelSpec]) -> dict[int, LabelSpec]:
        if any(k < 1 or k > 255 for k in v):
            raise ValueError("label numbers are 1…255 (0 is background)")
        return v


def _bundle_spec(path: Path) -> Path:
    return path / "configs" / "dicomnode.yaml"


class ModelRunnerParams(Params):
    model: Path  # TorchScript / ONNX file, or a MONAI bundle directory
    spec: Path | None = None  # YAML; default for a bundle: configs/dicomnode.yaml
    sw_batch_size: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ModelRunnerParams:
        if not self.model.exists():
            raise ValueError(f"model {self.model} does not exist")
        spec = self.spec or (_bundle_spec(self.model) if self.model.is_dir() else None)
        if spec is None:
            raise ValueError("spec (a YAML file) is required for a model file")
        if not spec.is_file():
            raise ValueError(f"spec {spec} does not exist")
        ModelSpec.model_validate(yaml.safe_load(spec.read_text()))  # errors name the key
        return self

    def load_spec(self) -> ModelSpec:
        spec = self.spec or _bundle_spec(self.model)
        return ModelSpec.model_validate(yaml.safe_load(spec.read_text()))


def load_predictor(model: Path, device: str) -> Any:
    """A callable torch.Tensor [B, C, z, y, x] → torch.Tensor for the model at ``model``."""
    import torch

    if model.is_dir():  # MONAI bundle: TorchScript export, or network_def + weights
        ts = model / "models" / "model.ts"
        if ts.is_file():
            net = torch.jit.load(str(ts), map_location=device)  # type: ignore[no-untyped-call]
        else:
            from monai.bundle import ConfigParser

            configs = [p for p in (model / "configs").glob("inference.*")
                       if p.suffix in (".json", ".yaml", ".yml")]
            if not configs:
                raise PluginError(f"bundle {model}: no configs/inference.json|yaml")
            parser = ConfigParser()
            parser.read_config(str(configs[0]))
            net = parser.get_parsed_content("network_def")
            weights = model / "models" / "model.pt"
            if not weights.is_file():
                raise PluginError(f"bundle {model}: no models/model.pt or models/model.ts")
            state = torch.load(str(weights), map_location=device, weights_only=True)
            net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict)
                                else state)
            net = net.to(device)
        net.eval()
        return net
    if model.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise PluginError("ONNX models need onnxruntime (pip install onnxruntime)") from e
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                     if device.startswith("cuda") else ["CPUExecutionProvider"])
        session = ort.InferenceSession(str(model), providers=providers)
        name = session.get_inputs()[0].name

        def run_onnx(x: Any) -> Any:
            out = session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0]
            return torch.from_numpy(out).to(x.device)

        return run_onnx
    net = torch.jit.load(str(model), map_location=device)  # type: ignore[no-untyped-call]
    net.eval()
    return net


def _resample(array: np.ndarray, factors: tuple[float, ...], order: int,
              shape: tuple[int, ...] | None = None) -> np.ndarray:
    from scipy.ndimage import zoom

    if all(abs(f - 1) < 1e-6 for f in factors) and shape in (None, array.shape):
        return array
    out = zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    if shape is not None and out.shape != shape:  # zoom rounds: pad/crop to the exact shape
        fixed = np.zeros(shape, dtype=out.dtype)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape, strict=True))
        fixed[sl] = out[sl]
        out = fixed
    return np.asarray(out)


class ModelRunner(Plugin[ModelRunnerParams]):
    name = "model-runner"
    version = "1.0.0"
    description = ("Your own TorchScript/ONNX model or MONAI bundle + a YAML spec → "
                   "sliding-window inference (MONAI) → SEG + SR volumes per label")
    algorithm_family = Code("123110", "DCM", "Artificial Intelligence")
    params_model = ModelRunnerParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=8192, timeout_seconds=1800)
    accepts = Accepts(min_instances=1)

    def run(self, inputs: Inputs, params: ModelRunnerParams, ctx: Context) -> Outputs:
        spec = params.load_spec()
        series = inputs.primary
        g = series.geometry
        hu = to_numpy(series.pixels(np)).astype(np.float32)
        factors = (1.0, 1.0, 1.0) if spec.spacing_mm is None else tuple(
            s / t for s, t in zip(g.spacing, spec.spacing_mm, strict=True))
        x = _model_input(hu, spec, factors)
        labels = _labels(_infer(x, spec, params, ctx), spec)
        labels = _resample(labels, tuple(1 / f for f in factors), order=0, shape=g.shape)
        unknown = sorted(set(np.unique(labels).tolist()) - {0} - set(spec.labels))
        if unknown:
            raise PluginError(f"model produced labels {unknown} that the spec does not name")
        present = [k for k in sorted(spec.labels) if (labels == k).any()]
        summary = ", ".join(f"{spec.labels[k].label} "
                            f"{(labels == k).sum() * float(np.prod(g.spacing)) / 1000:.1f} mL"
                            for k in present) or "nothing segmented"
        ctx.log.info("%s %s: %s", spec.name, spec.version, summary)
        algorithm = (f"{self.name}:{spec.name}", f"{self.version}/{spec.version}")
        if not present:
            return Outputs(summary=summary, algorithm=algorithm)
        return _segmentation(series, spec, labels, present, summary, algorithm)


def _model_input(hu: np.ndarray, spec: ModelSpec, factors: tuple[float, ...]) -> np.ndarray:
    """The volume as the model was trained on it: at its spacing, windowed and normalized
    as its spec says."""
    x = _resample(hu, factors, order=1)
    if spec.window is not None:
        x = np.clip(x, *spec.window)
    if spec.normalize == "minmax":
        lo, hi = spec.window if spec.window is not None else (float(x.min()),
                                                             float(x.max()))
        x = (x - lo) / max(hi - lo, 1e-6)
    elif spec.normalize == "zscore":
        x = (x - x.mean()) / max(float(x.std()), 1e-6)
    return x


def _infer(x: np.ndarray, spec: ModelSpec, params: ModelRunnerParams, ctx: Context
           ) -> np.ndarray:
    """The model's raw output (channels first) from MONAI's sliding-window inference, on the
    job's device: volumes larger than the patch size are seen patch by patch, blended."""
    import torch
    from monai.inferers import sliding_window_inference

    device = "cuda" if ctx.device.startswith("cuda") else "cpu"
    predictor = load_predictor(params.model, device)
    tensor = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device)
    roi = tuple(min(p, s) for p, s in zip(spec.patch_size, x.shape, strict=True))
    with torch.no_grad():
        raw: Any = sliding_window_inference(tensor, roi, params.sw_batch_size, predictor,
                                            overlap=spec.overlap, mode="gaussian")
    y: np.ndarray = raw[0].float().cpu().numpy()
    return y


def _labels(y: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A label per voxel from the model's output, as the spec says the model answers:
    softmax (channel 0 background), sigmoid (a channel per label) or labels already."""
    labels: np.ndarray
    if spec.output == "softmax":
        labels = np.argmax(y, axis=0).astype(np.uint8)
    elif spec.output == "sigmoid":
        fg = y > 0.5
        labels = np.where(fg.any(axis=0), np.argmax(y, axis=0) + 1, 0).astype(np.uint8)
    else:
        labels = np.rint(y[0]).astype(np.uint8)
    return labels


def _segmentation(series: SeriesInput, spec: ModelSpec, labels: np.ndarray, present: list[int],
                  summary: str, algorithm: tuple[str, str]) -> Outputs:
    """A SEG segment and a volume finding per label present, renumbered 1… in the spec's
    label order (a SEG's segment numbers start at 1 and have no gaps)."""
    g = series.geometry
    remap = np.zeros(256, dtype=np.uint8)
    segments, findings = [], []
    for i, k in enumerate(present, start=1):
        remap[k] = i
        s = spec.labels[k]
        category, kind = Code(*s.category), Code(*s.type)
        segments.append(Segment(i, s.label, category, kind))
        voxels = int((labels == k).sum())
        findings.append(Finding(kind, measurements=(
            Measurement(VOLUME, round(voxels * float(np.prod(g.spacing)) / 1000, 4), "ml"),),
            segment=i, source_series_uid=series.series_uid))
    return Outputs(findings=tuple(findings),
                   label_maps=(LabelMap(remap[labels], g, tuple(segments),
                                        series.series_uid),),
                   summary=summary, algorithm=algorithm)
