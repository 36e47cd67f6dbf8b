"""Writing NIfTI files fast: the gzip of a float anomaly map (tens of MB for a brain volume) is most of the time
nibabel needs to write it, and ISA-L writes the same gzip format several times faster than zlib."""

from __future__ import annotations

import nibabel as nib
from isal import igzip

__all__ = ["save_nifti"]


def save_nifti(image: nib.Nifti1Image, path: str) -> None:
    """Write ``image`` to ``path``: a ``.nii.gz`` as nibabel's single-file bytes, gzipped by ISA-L (level 1, no
    timestamp, so equal images give equal files); any other ending as ``nibabel.save`` writes it."""
    if not str(path).endswith(".gz"):
        nib.save(image, path)
        return
    compressed = igzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    with open(path, "wb") as f:
        f.write(compressed)
