"""HU threshold → one segment and its volume. The worked example of docs/plugins.md."""

from __future__ import annotations

from dicomnode.plugin import (
    GPU,
    Accepts,
    Code,
    Context,
    Finding,
    Inputs,
    LabelMap,
    Measurement,
    Needs,
    NotApplicable,
    Outputs,
    Params,
    Plugin,
    Segment,
    to_numpy,
)

VOLUME = Code("118565006", "SCT", "Volume")
TISSUE = Code("85756007", "SCT", "Tissue")


class ThresholdParams(Params):
    hu_min: float = 300.0
    hu_max: float | None = None
    label: str = "Dense tissue"


class Threshold(Plugin[ThresholdParams]):
    name = "threshold"
    version = "1.0.0"
    description = "Voxels within [hu_min, hu_max] HU as one segment, with its volume in mL."
    algorithm_family = Code("123105", "DCM", "Histogram Analysis")
    params_model = ThresholdParams
    needs = Needs(gpu=GPU.PREFERRED, memory_mb=1024, timeout_seconds=120)
    accepts = Accepts(modalities=("CT",), min_instances=2)

    def run(self, inputs: Inputs, params: ThresholdParams, ctx: Context) -> Outputs:
        series = inputs.primary
        if series.modality != "CT":
            raise NotApplicable(f"needs CT (Hounsfield units), got {series.modality}")
        xp = ctx.xp  # NumPy on CPU, CuPy on a GPU: one code path
        hu = series.pixels(xp)
        mask = hu >= params.hu_min
        if params.hu_max is not None:
            mask &= hu <= params.hu_max
        voxels = int(mask.sum())
        if voxels == 0:
            return Outputs(summary=f"no voxel at or above {params.hu_min} HU")
        g = series.geometry
        ml = voxels * g.voxel_ml
        centre = g.to_patient([float(c) for c in to_numpy(xp.argwhere(mask).mean(axis=0))])
        labels = to_numpy(mask).astype("uint8")
        ctx.log.info("threshold %s HU: %d voxels, %.2f mL", params.hu_min, voxels, ml)
        return Outputs(
            label_maps=(LabelMap(labels, g, (Segment(1, params.label, TISSUE, TISSUE),),
                                 series.series_uid),),
            findings=(Finding(TISSUE, (Measurement(VOLUME, ml, "ml"),), location=centre,
                              segment=1, source_series_uid=series.series_uid),),
            summary=f"{voxels} voxels in window, {ml:.2f} mL",
        )
