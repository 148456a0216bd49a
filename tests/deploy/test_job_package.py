"""What `ray job submit --working-dir .` uploads from this repository, built with Ray's own packaging.

Ray zips the directory (leaving out its default excludes and what `.gitignore`/`.rayignore` list) and
refuses a package over its gRPC limit; every job submission and every node pays for the upload. The
check: the code and the shipped demo model go, the virtualenv, git history, caches and outputs do not.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_PACKAGE_MB = 20  # today about 5 MB (the demo model is most of it)


def test_working_dir_package_is_small_and_holds_what_the_jobs_import(tmp_path):
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    assert (REPO / ".venv").is_dir()  # the README's install (and CI) puts the virtualenv in the repository
    target = tmp_path / "package.zip"
    create_package(str(REPO), target, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    names = set(zipfile.ZipFile(target).namelist())
    assert target.stat().st_size < MAX_PACKAGE_MB * 2**20, target.stat().st_size
    for needed in ["jobs/caption.py", "raylens/images.py", "raylens/demo/model/model.safetensors", "pyproject.toml"]:
        assert needed in names, needed
    for name in names:
        top = name.split("/", 1)[0]
        assert top not in {".git", ".venv", "out", ".devsite", ".whl", ".pytest_cache"}, name
        assert "__pycache__" not in name, name
