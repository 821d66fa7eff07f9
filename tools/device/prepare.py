"""Pack what a borrowed GPU machine needs to run emrun's benchmarks into carry-sized loads.

Why: the GPU machines this project borrows (the `device` tool) reach no network, come with
Python 3.12, CUDA torch, numpy, scipy, tifffile, h5py, typer, rich, tensorboard and pyyaml, and
take at most 64 MiB per call, working tree included. A session has about 15 minutes of device
time, so everything else emrun needs (pydantic, zarr, numba, mwatershed, waterz, MONAI, ...)
and the SNEMI3D volumes must arrive in as few calls as possible. This script, run here:

1. downloads the missing wheels for CPython 3.12 on manylinux x86-64, at the versions
   installed in this environment (the ones the tests ran with);
2. repacks each wheel as an xz-compressed tar (llvmlite's 60 MB wheel becomes 39 MB) and
   compresses the SNEMI3D TIFFs with xz behind a byte-delta filter (73 MB becomes 55 MB);
3. cuts these blobs into loads `.device/load1`, `.device/load2`, ... of at most
   ``--budget-mib`` each, every load carrying the whole manifest.

On the device, `python3 tools/device/unpack.py .device/loadK` unpacks one load; blobs complete
when their last part arrives. `bash tools/device/run.sh MODE` then runs the benchmarks.
See tools/device/README.md for the call sequence.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / ".device"

# On the device already (with their own dependencies): leave them out, they are large.
DEVICE_HAS = {
    "torch", "triton", "numpy", "scipy", "tifffile", "h5py", "typer", "click", "rich",
    "tensorboard", "pyyaml", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock",
    "fsspec", "setuptools", "typing-extensions", "markdown-it-py", "mdurl", "pygments",
    "shellingham", "protobuf", "grpcio", "absl-py", "markdown", "werkzeug",
    "tensorboard-data-server", "packaging",
}
# Not emrun dependencies, but what its benchmarks compare with or segment by.
EXTRAS = ["monai", "waterz"]
WHEEL_TAGS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
              "manylinux_2_27_x86_64", "manylinux_2_28_x86_64", "any"]
SNEMI3D_FILES = ["train-input.tif", "train-labels.tif"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of a distribution's unconditional requirements (markers with `extra` skipped)."""
    names = []
    for requirement in dist.requires or []:
        head, _, marker = requirement.partition(";")
        if "extra" in marker:
            continue
        if marker.strip() and not _marker_holds(marker):
            continue
        names.append(_canonical(re.split(r"[\s<>=!~\[(]", head.strip(), maxsplit=1)[0]))
    return names


def _marker_holds(marker: str) -> bool:
    """Evaluate an environment marker for the device (CPython 3.12, Linux x86-64)."""
    from packaging.markers import Marker

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "extra": ""}
    return Marker(marker).evaluate(env)


def needed_distributions() -> dict[str, str]:
    """emrun's runtime dependency closure plus EXTRAS, minus DEVICE_HAS: name -> version."""
    wanted: dict[str, str] = {}
    stack = _requirement_names(metadata.distribution("emrun")) + list(EXTRAS)
    while stack:
        name = stack.pop()
        if name in wanted or name in DEVICE_HAS or name == "emrun":
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed here: install emrun with `pip install -e "
                     f"'.[dev]' monai` first, so that its version is the tested one")
        wanted[name] = dist.version
        stack.extend(_requirement_names(dist))
    return dict(sorted(wanted.items()))


def _cached_wheels(folder: Path) -> dict[tuple[str, str], Path]:
    """The wheels in ``folder`` by (canonical name, normalised version): a cache that holds
    an older version of a distribution must not hand that one out."""
    from packaging.version import Version

    return {(_canonical(p.name.split("-")[0]), str(Version(p.name.split("-")[1]))): p
            for p in folder.glob("*.whl")}


def download_wheels(wanted: dict[str, str], folder: Path) -> list[Path]:
    from packaging.version import Version

    folder.mkdir(parents=True, exist_ok=True)
    keys = {name: (name, str(Version(version))) for name, version in wanted.items()}
    have = _cached_wheels(folder)
    missing = [f"{name}=={wanted[name]}" for name, key in keys.items() if key not in have]
    if missing:
        platforms = [arg for tag in WHEEL_TAGS for arg in ("--platform", tag)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12", *platforms,
                        "--dest", str(folder), *missing], check=True)
    wheels = _cached_wheels(folder)
    return [wheels[key] for key in keys.values()]


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def repack_wheel(wheel: Path, folder: Path) -> Path:
    """A wheel's files as an xz tar: deflate leaves shared libraries half compressed."""
    blob = folder / (wheel.name[:-len(".whl")] + ".tar.xz")
    if blob.exists():
        return blob
    folder.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, lzma.open(partial, "wb", preset=9) as packed, \
            tarfile.open(fileobj=packed, mode="w|") as tar:
        for info in archive.infolist():
            if info.is_dir():
                continue
            member = tarfile.TarInfo(info.filename)
            member.size = info.file_size
            member.mode = (info.external_attr >> 16) & 0o777 or 0o644
            tar.addfile(member, io.BytesIO(archive.read(info)))
    partial.rename(blob)
    return blob


def compress_file(source: Path, folder: Path) -> Path:
    """xz behind a one-byte delta filter: EM images are smooth along a row (0.75 of raw)."""
    blob = folder / (source.name + ".xz")
    if blob.exists():
        return blob
    folder.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".partial")
    filters = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
    with source.open("rb") as raw, lzma.open(partial, "wb", format=lzma.FORMAT_XZ,
                                             filters=filters) as packed:
        shutil.copyfileobj(raw, packed, 1 << 20)
    partial.rename(blob)
    return blob


def cut_into_loads(blobs: list[dict], budget: int, out: Path) -> int:
    """Fill loads in order, wheels first (every mode needs them), then the data files, each
    largest first, splitting a blob where a load is full."""
    for old in out.glob("load*"):
        shutil.rmtree(old)
    load, room, parts = 1, budget, []
    for blob in sorted(blobs, key=lambda b: (b["kind"] != "wheel", -b["size"])):
        path, offset, index = Path(blob["path"]), 0, 0
        with path.open("rb") as source:
            while offset < blob["size"]:
                if room == 0:
                    load, room = load + 1, budget
                take = min(room, blob["size"] - offset)
                folder = out / f"load{load}"
                folder.mkdir(parents=True, exist_ok=True)
                part = folder / f"{path.name}.part{index:02d}"
                part.write_bytes(source.read(take))
                parts.append({"blob": path.name, "index": index, "load": load})
                offset, room, index = offset + take, room - take, index + 1
        blob["parts"] = index
    manifest = {"blobs": [{k: b[k] for k in ("name", "kind", "target", "size", "sha256",
                                              "parts")} for b in blobs], "parts": parts}
    for folder in out.glob("load*"):
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--snemi3d", type=Path, default=ROOT.parent / "shared/data/snemi3d",
                        help="folder with SNEMI3D's train-input.tif and train-labels.tif "
                        "(skipped with a note when absent)")
    parser.add_argument("--no-data", action="store_true", help="wheels only (infer, train "
                        "and segment benchmarks use synthetic volumes)")
    parser.add_argument("--budget-mib", type=float, default=61.0,
                        help="largest load; the working tree (about 2 MiB) travels too")
    args = parser.parse_args()
    cache = DEVICE / "cache"
    wanted = needed_distributions()
    print(f"{len(wanted)} distributions to carry: "
          + ", ".join(f"{n} {v}" for n, v in wanted.items()))
    blobs = []
    for wheel in download_wheels(wanted, cache / "wheels"):
        blob = repack_wheel(wheel, cache / "blobs")
        blobs.append({"name": blob.name, "kind": "wheel", "target": "site", "path": str(blob)})
    if not args.no_data:
        if all((args.snemi3d / f).is_file() for f in SNEMI3D_FILES):
            for name in SNEMI3D_FILES:
                blob = compress_file(args.snemi3d / name, cache / "blobs")
                blobs.append({"name": blob.name, "kind": "file",
                              "target": f"data/snemi3d/{name}", "path": str(blob)})
        else:
            print(f"no SNEMI3D files in {args.snemi3d}: the snemi mode will not have its data")
    for blob in blobs:
        blob["size"] = Path(blob["path"]).stat().st_size
        blob["sha256"] = _digest(Path(blob["path"]))
    loads = cut_into_loads(blobs, int(args.budget_mib * 2**20), DEVICE)
    total = sum(b["size"] for b in blobs) / 2**20
    print(f"{total:.1f} MiB in {loads} loads:")
    for k in range(1, loads + 1):
        size = sum(p.stat().st_size for p in (DEVICE / f"load{k}").iterdir()) / 2**20
        print(f"  .device/load{k}: {size:.1f} MiB")


if __name__ == "__main__":
    main()
