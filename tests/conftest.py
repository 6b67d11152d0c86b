"""Shared fixtures: the repository on sys.path, the embedded synthetic dataset in both layouts, and the
optional real mini-datasets in ../shared/data (present on development machines, absent in CI)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The notebook test (and make_config() without a profile) must run the CPU smoke profile, in a fresh
# output folder (a stale runs/smoke from older code would otherwise be resumed).
os.environ.setdefault("UNIHEAD_PROFILE", "smoke")
os.environ.setdefault("UNIHEAD_OUT_DIR", tempfile.mkdtemp(prefix="unihead-tests-"))

# CI clones the repository with shared/ beside it: <parent>/main (this repo) and <parent>/shared/data.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real mini-datasets not found at {SHARED_DATA}")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The synthetic dataset in the 'shared' layout (FiftyOne COCO export, flat VOC pairs, wnid folders)."""
    import helpers as H
    return H.make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_shared"), layout="shared")


@pytest.fixture(scope="session")
def synthetic_course_root(tmp_path_factory) -> Path:
    """The synthetic dataset in the 'course' layout (instances_*2017.json, JPEGImages/ + SegmentationClass/,
    numbered class folders)."""
    import helpers as H
    return H.make_synthetic_dataset(tmp_path_factory.mktemp("synthetic_course"), layout="course")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real mini-datasets not found at {SHARED_DATA}")
    return SHARED_DATA
