"""Time of writing the DICOM SEG + Parametric Map + JSON of one volume (``write_dicom_outputs``).

The volume (a BraTS FLAIR NIfTI, or a generated phantom when none is given) is first written as an MR
series; the "map" is its intensity scaled to [0, 1] (writing time does not depend on the values), with the
threshold at 0.5. Prints the shape, the median time of ``--repeats`` writes and the file sizes.

    python scripts/benchmark_dicom_outputs.py --volume ../shared/data/brats2015/pat0003/flair.nii.gz
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import nibabel as nib
import numpy as np

from multiad_monai.data import load_volume, make_demo_volumes
from multiad_monai.data.dicom_outputs import write_dicom_outputs
from multiad_monai.data.dicom_series import write_dicom_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default="", help="NIfTI volume; empty: a generated 96x96x48 phantom")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.volume or os.path.join(make_demo_volumes(os.path.join(tmp, "cases"), num_cases=2), "case001", "flair.nii.gz")
        image = nib.load(path)
        series = os.path.join(tmp, "series")
        write_dicom_series(np.asarray(image.dataobj), image.affine, series)
        volume = load_volume(series)
        anomaly_map = volume / volume.max()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            written = write_dicom_outputs(
                os.path.join(tmp, "out"), "case", series, anomaly_map, volume.affine.numpy(), 0.5,
                np.zeros(volume.shape[3]), 1.0,
            )
            times.append(time.perf_counter() - start)
        sizes = {kind: os.path.getsize(p) / 2**20 for kind, p in written.items()}
        print(f"volume {path} shape {tuple(volume.shape[1:])}")
        print(f"write_dicom_outputs: median {statistics.median(times):.2f} s over {args.repeats} (all: {', '.join(f'{t:.2f}' for t in times)})")
        print("sizes MiB: " + ", ".join(f"{kind} {size:.1f}" for kind, size in sizes.items()))


if __name__ == "__main__":
    main()
