"""A Kubernetes ConfigMap or Secret volume, laid out as the kubelet lays it out, for the tests of
bumper reading its policy and CA from one (docs/deploy.md, "On Kubernetes")."""

from __future__ import annotations

import os
from pathlib import Path


def kubelet_volume(volume: Path, files: dict[str, str], version: int, mode: int = 0o644, group: int = -1) -> None:
    """Write FILES into VOLUME as the kubelet's AtomicWriter writes and updates a mounted ConfigMap or
    Secret: the files in a new timestamped directory (MODE, and GROUP: the pod's fsGroup), then the
    `..data` symlink swapped to it by a rename (atomic), the old directory removed. Each key is a
    symlink through `..data`, made once: a reader of `policy.yaml` sees the old file or the new one,
    never half of each, and the path itself never changes."""
    stamped = volume / f"..2026_12_07_12_00_0{version}.{version:09d}"
    stamped.mkdir()
    for name, text in files.items():
        (stamped / name).write_text(text)
        os.chown(stamped / name, -1, group)
        (stamped / name).chmod(mode)
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(Path("..data") / name)
    old = (volume / "..data").readlink() if (volume / "..data").is_symlink() else None
    (volume / "..data_tmp").symlink_to(stamped.name)
    (volume / "..data_tmp").rename(volume / "..data")
    if old is not None:
        for leftover in (volume / old).iterdir():
            leftover.unlink()
        (volume / old).rmdir()
