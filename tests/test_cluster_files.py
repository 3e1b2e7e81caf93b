"""The cluster image: cluster/Dockerfile states the tag once; `ray up` and KubeRay files run that tag;
the Dockerfile's Ray/Python/torch match the package's pins; use_image.py retags every file."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from promptmm_dist.paths import REPO_ROOT

CLUSTER = REPO_ROOT / "cluster"
MANIFESTS = ("ray-up.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


def _use_image(folder: Path = CLUSTER):
    spec = importlib.util.spec_from_file_location(f"use_image_{abs(hash(folder))}", folder / "use_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(node) -> list[str]:
    """Every `image:` value in a parsed manifest (containers, ray up's docker section)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                found.append(value)
            else:
                found += _images(value)
    elif isinstance(node, list):
        for value in node:
            found += _images(value)
    return found


def test_dockerfile_states_one_tag_and_matches_the_package_pins():
    tag = _use_image().image_tag()
    text = (CLUSTER / "Dockerfile").read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    base = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE).group(1)
    assert base == f"rayproject/ray:{ray_pin}-py311-cpu"
    assert f'"torch=={torch_pin}"' in text and "download.pytorch.org/whl/cpu" in text
    assert re.search(r"^FROM \$\{BASE\}$", text, re.MULTILINE)
    assert "pip install --no-cache-dir /home/ray/app" in text
    assert f"ray{ray_pin}" in tag and "py311" in tag


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_parse_and_run_the_dockerfile_tag(name):
    tag = _use_image().image_tag()
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    images = [image for doc in docs for image in _images(doc)]
    assert images and set(images) == {tag}, images
    if name.startswith("kuberay"):
        assert all(doc["apiVersion"] == "ray.io/v1" for doc in docs)


def test_ray_up_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["docker"]["image"] == _use_image().image_tag()


def test_use_image_retags_every_file_and_check_notices_a_stray_tag(tmp_path, capsys):
    folder = tmp_path / "cluster"
    shutil.copytree(CLUSTER, folder, ignore=shutil.ignore_patterns("__pycache__", "local_cluster.py"))
    tool = _use_image(folder)
    assert tool.main([]) == 0
    new = "registry.example.com/me/promptmm-dist:9.9.9-ray2.60.0-py311-cpu"
    assert tool.main([new]) == 0
    assert tool.image_tag() == new
    for name in MANIFESTS:
        docs = [d for d in yaml.safe_load_all((folder / name).read_text()) if d is not None]
        assert {image for doc in docs for image in _images(doc)} == {new}
    (folder / "kuberay-rayjob.yaml").write_text((folder / "kuberay-rayjob.yaml").read_text().replace(new, "x/y:1"))
    assert tool.main([]) == 1
    assert "kuberay-rayjob.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.retag("not a tag")


def test_use_image_runs_as_a_script():
    import subprocess

    proc = subprocess.run([sys.executable, str(CLUSTER / "use_image.py")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == _use_image().image_tag()
