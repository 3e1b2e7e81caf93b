"""The cluster image tag, stated once in cluster/Dockerfile (`# IMAGE=...`), used by every cluster file.

    python cluster/use_image.py                      # print the tag and check every file uses it
    python cluster/use_image.py ghcr.io/me/promptmm-dist:0.2.0-ray2.60.0-py311-cpu   # retag everywhere

Standard library only (runs before anything is installed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCKERFILE = HERE / "Dockerfile"
USERS = ("ray-up.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "README.md")  # files naming the tag
IMAGE_LINE = re.compile(r"^# IMAGE=(\S+)\s*$", re.MULTILINE)
TAG = re.compile(r"^[a-z0-9][a-z0-9._/:-]*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def image_tag(dockerfile: Path = DOCKERFILE) -> str:
    """The `# IMAGE=...` line of the Dockerfile."""
    found = IMAGE_LINE.findall(dockerfile.read_text())
    if len(found) != 1:
        raise SystemExit(f"{dockerfile}: expected one '# IMAGE=registry/name:tag' line, found {len(found)}")
    return found[0]


def files_missing(tag: str) -> list[str]:
    return [name for name in USERS if tag not in (HERE / name).read_text()]


def retag(new: str) -> None:
    if not TAG.match(new):
        raise SystemExit(f"use_image: {new!r} is not an image reference like registry/name:tag")
    old = image_tag()
    for path in (DOCKERFILE, *(HERE / name for name in USERS)):
        path.write_text(path.read_text().replace(old, new))
    print(f"{old} -> {new} in Dockerfile, {', '.join(USERS)}")


def main(argv: list[str]) -> int:
    if argv:
        retag(argv[0])
    tag = image_tag()
    missing = files_missing(tag)
    print(tag)
    if missing:
        print(f"use_image: not using {tag}: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
