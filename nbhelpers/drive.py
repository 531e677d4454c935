"""Persistent storage of a notebook runtime: Google Drive on Colab, ``/kaggle/working`` on Kaggle."""

from __future__ import annotations

from pathlib import Path

from .platform import PlatformInfo

DRIVE_MOUNT_POINT = "/content/drive"


def mount_drive(platform: PlatformInfo, enabled: bool = True) -> Path | None:
    """Mount Google Drive on Colab and create the persistent folder; say where checkpoints persist
    elsewhere. Returns the persistent folder, or None where there is none (local: ./runs only; Colab
    without ``enabled``: set persistent_root = "none" in 10_train then)."""
    if platform.name == "colab" and not enabled:
        print("Google Drive not mounted (use_drive = False): checkpoints stay on the VM; set "
              "persistent_root = \"none\" in 10_train")
        return None
    if platform.name == "colab":
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(DRIVE_MOUNT_POINT)
        root = Path(platform.persistent_root)
        root.mkdir(parents=True, exist_ok=True)
        print(f"Google Drive mounted: checkpoints are copied to {root} and a rerun resumes from there")
        return root
    if platform.name == "kaggle":
        root = Path(platform.persistent_root)
        root.mkdir(parents=True, exist_ok=True)
        print(f"Kaggle: checkpoints are copied to {root}; it is kept with the notebook's output when you "
              "'Save Version' (Save & Run All), and a rerun resumes from there")
        return root
    print("local: runs stay in ./runs (nothing to mount)")
    return None
