"""`promptmm prepare`: validate any supported layout and write the canonical one, atomically.

Canonical layout (what the rest of the pipeline prefers to read, fast and self-describing):

    interactions.parquet   user int32, item int32, split int8 (0 train, 1 val, 2 test), sorted
    features/<name>.npy    float32, row i = item i
    manifest.json          counts, modalities (dim, on-disk and source dtype), sha256 and size of every
                           file, content hash, source format, creating version, and the packaged
                           recipe the data asks for (`prepare --recipe NAME`; null = the defaults)

Why atomic: a crash or a bad input must never leave a half-written dataset that a later run could
mistake for a good one. Everything is written into a hidden temporary folder beside OUT and renamed
into place at the end; on any failure the temporary folder is removed and OUT is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from promptmm_dist import __version__
from promptmm_dist.data import formats as F
from promptmm_dist.data.dataset import SPLIT_NAMES, InteractionData
from promptmm_dist.data.validate import DataWarning
from promptmm_dist.errors import DataError

FORMAT_VERSION = 1


def prepare_dataset(src: str | Path, out: str | Path, format: str = "auto", force: bool = False,
                    recipe: str | None = None) -> Path:
    """Load and validate `src`, then write the canonical layout to `out` (replaced only with force).

    `recipe` (a packaged recipe name) is written into the manifest, so every run on this data uses it
    wherever the folder lives; None keeps a prepared source's own recipe, "none" drops it."""
    out = Path(out)
    recipe = _manifest_recipe_for(src, recipe)
    _check_target(src, out, force)
    loaded = F.load_source(src, format)
    return write_canonical(loaded.data, out, force=force, source_dtypes=loaded.source_dtypes,
                           origin_format=loaded.origin_format, source_path=loaded.path, recipe=recipe)


def _manifest_recipe_for(src: str | Path, recipe: str | None) -> str | None:
    """The recipe OUT's manifest will name: `recipe` checked (names only: a manifest travels with the
    data, a path would not), else the source manifest's."""
    from promptmm_dist.config import RECIPE_NONE, check_recipe

    if recipe is None:
        recipe, where = F.manifest_recipe(src)
        if recipe is None:
            return None
        check_recipe(recipe, where, names_only=True)
    else:
        check_recipe(recipe, "--recipe", names_only=True)
    return None if recipe == RECIPE_NONE else recipe


def ensure_canonical(data: InteractionData, folder: str | Path) -> Path:
    """Make `folder` hold `data` in canonical form; reuse it when its content hash already matches.

    Used by the pipeline for in-memory datasets (synthetic, subsets). A folder that is not a prepared
    dataset is never replaced (it might be the user's own data)."""
    folder = Path(folder)
    digest = data.manifest_sha256 or F.content_sha256(data)
    if (folder / F.MANIFEST).is_file():
        try:
            if F.read_manifest(folder).get("content_sha256") == digest:
                return folder
        except DataError:
            pass  # unreadable manifest: rewrite below
    elif folder.exists():
        raise DataError(folder, None, "exists and is not a prepared dataset; refusing to replace it")
    return write_canonical(data, folder, force=True, origin_format=data.source_format)


def write_canonical(data: InteractionData, out: str | Path, *, force: bool = False,
                    source_dtypes: dict[str, str] | None = None, origin_format: str | None = None,
                    source_path: Path | None = None, recipe: str | None = None) -> Path:
    """Write `data` to `out` atomically (temp folder beside it, then rename). Returns `out`."""
    out = Path(out)
    if out.exists() and not force:
        raise DataError(out, None, "already exists; pass --force to replace it")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp_dir(parent, out.name)
    except OSError as err:
        raise DataError(out, None, f"cannot create: {err.strerror or err}") from None
    try:
        _write_contents(data, tmp, source_dtypes or {}, origin_format or data.source_format, source_path,
                        recipe)
        _swap_into_place(tmp, out.absolute())
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise DataError(out, None, f"cannot write: {err.strerror or err}") from None
        raise
    return out


def _make_temp_dir(parent: Path, name: str) -> Path:
    """Hidden folder beside OUT (same filesystem, so the final rename is atomic). Unlike mkdtemp it
    honours the umask, so the renamed OUT gets the user's usual permissions."""
    for _ in range(100):
        tmp = parent / f".{name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {parent / name}")  # pragma: no cover


def _check_target(src: str | Path, out: Path, force: bool) -> None:
    """Refuse before any work: OUT exists without --force, or OUT is (or contains) the source."""
    if out.exists() and not force:
        raise DataError(out, None, "already exists; pass --force to replace it")
    if F.is_synthetic(src):
        return
    s, o = Path(src).resolve(), out.resolve()
    if s == o or o in s.parents:
        raise DataError(out, None, "must not be the source folder or contain it")


def _write_contents(data: InteractionData, tmp: Path, source_dtypes: dict[str, str], origin: str,
                    source_path: Path | None, recipe: str | None = None) -> None:
    (tmp / F.FEATURES_DIR).mkdir()
    files = [F.INTERACTIONS_FILE]
    _write_parquet(data, tmp / F.INTERACTIONS_FILE)
    for name, feat in data.features.items():
        rel = f"{F.FEATURES_DIR}/{name}.npy"
        np.save(tmp / rel, np.ascontiguousarray(feat, dtype=np.float32), allow_pickle=False)
        files.append(rel)
    manifest = build_manifest(data, tmp, files, source_dtypes, origin, source_path, recipe)
    (tmp / F.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_parquet(data: InteractionData, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"user": pa.array(data.users.astype(np.int32, copy=False)),
                      "item": pa.array(data.items.astype(np.int32, copy=False)),
                      "split": pa.array(data.splits.astype(np.int8, copy=False))})
    pq.write_table(table, path, compression="zstd")


def build_manifest(data: InteractionData, root: Path, files: list[str], source_dtypes: dict[str, str],
                   origin: str, source_path: Path | None, recipe: str | None = None) -> dict[str, Any]:
    counts = {name: data.n_interactions(code) for name, code in SPLIT_NAMES.items()}
    return {
        "format": "promptmm_dist canonical", "format_version": FORMAT_VERSION,
        "name": data.name, "source_format": origin,
        "source_path": str(source_path.resolve()) if source_path is not None else None,
        "n_users": data.n_users, "n_items": data.n_items,
        "interactions": {**counts, "total": int(len(data.users))},
        "modalities": {m: {"dim": int(f.shape[1]), "dtype_on_disk": "float32",
                           "source_dtype": source_dtypes.get(m, str(f.dtype))}
                       for m, f in data.features.items()},
        "files": {rel: F.file_sha256(root / rel) for rel in files},
        "sizes": {rel: (root / rel).stat().st_size for rel in files},
        "content_sha256": data.manifest_sha256 or F.content_sha256(data),
        "recipe": recipe,  # not part of the content hash: the same data with another recipe is the same data
        "created_by": f"promptmm_dist {__version__}",
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """rename(tmp, out); an existing OUT is moved aside first and deleted only after the swap."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    aside = old / "previous"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare_command(args: argparse.Namespace) -> int:
    """`promptmm prepare SRC OUT [--format F] [--force] [--recipe NAME]`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        out = prepare_dataset(args.src, args.out, format=args.format, force=args.force,
                              recipe=getattr(args, "recipe", None))
    manifest = F.read_manifest(out)
    inter = manifest["interactions"]
    mods = ", ".join(f"{m}:{v['dim']}" for m, v in manifest["modalities"].items())
    print(f"prepared {manifest['name']} ({manifest['source_format']}) -> {out}: {manifest['n_users']:,} users, "
          f"{manifest['n_items']:,} items, train {inter['train']:,} / val {inter['val']:,} / "
          f"test {inter['test']:,}, modalities {mods}, recipe {manifest.get('recipe') or 'none (defaults)'}")
    print_warnings(caught)
    return 0


def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Data warnings as single 'promptmm: warning:' lines (not Python's two-line format)."""
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"promptmm: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
