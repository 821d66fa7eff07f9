"""Unpack one load made by prepare.py, on the GPU machine (standard library only).

Usage: python3 tools/device/unpack.py .device/loadK [...]

Parts are copied under $EMRUN_DEVICE (default /tmp/emrun-device), which a warm machine keeps
between calls. A blob whose parts have all arrived is checked against its SHA-256 and
unpacked: wheels into $EMRUN_DEVICE/site (put it on PYTHONPATH), files under
$EMRUN_DEVICE/data. The last line says what is complete and what still waits for a load.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import sys
import tarfile
from pathlib import Path

STATE = Path(os.environ.get("EMRUN_DEVICE", "/tmp/emrun-device"))


def _assemble(blob: dict, parts: Path) -> Path:
    whole = parts / blob["name"]
    sha = hashlib.sha256()
    with whole.open("wb") as out:
        for index in range(blob["parts"]):
            piece = parts / f"{blob['name']}.part{index:02d}"
            data = piece.read_bytes()
            sha.update(data)
            out.write(data)
            piece.unlink()
    if sha.hexdigest() != blob["sha256"]:
        whole.unlink()
        sys.exit(f"{blob['name']}: checksum mismatch, carry its loads again")
    return whole


def _install(blob: dict, whole: Path) -> None:
    if blob["kind"] == "wheel":
        with lzma.open(whole) as packed, tarfile.open(fileobj=packed, mode="r|") as tar:
            tar.extractall(STATE / "site", filter="data")
    else:
        target = STATE / blob["target"]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with lzma.open(whole) as packed, partial.open("wb") as out:
            shutil.copyfileobj(packed, out, 1 << 20)
        partial.rename(target)
    whole.unlink()


def unpack(load: Path) -> tuple[list[str], list[str]]:
    manifest = json.loads((load / "manifest.json").read_text())
    parts, done = STATE / "parts", STATE / "done"
    parts.mkdir(parents=True, exist_ok=True)
    done.mkdir(parents=True, exist_ok=True)
    for piece in load.glob("*.part*"):
        shutil.copyfile(piece, parts / piece.name)  # the load stays whole (a local try)
    complete, waiting = [], []
    for blob in manifest["blobs"]:
        if (done / blob["name"]).exists():
            complete.append(blob["name"])
            continue
        arrived = all((parts / f"{blob['name']}.part{i:02d}").exists()
                      for i in range(blob["parts"]))
        if not arrived:
            loads = sorted({p["load"] for p in manifest["parts"] if p["blob"] == blob["name"]})
            waiting.append(f"{blob['name']} (loads {loads})")
            continue
        _install(blob, _assemble(blob, parts))
        (done / blob["name"]).touch()
        complete.append(blob["name"])
    return complete, waiting


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        complete, waiting = unpack(Path(arg))
    print(f"{len(complete)} blobs unpacked under {STATE}; "
          + (f"waiting for: {', '.join(waiting)}" if waiting else "nothing waits"))


if __name__ == "__main__":
    main()
