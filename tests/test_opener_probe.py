"""How `open_volume` takes the paths and URLs users type: empty ones, `.`/`..` inside a
container, URLs with a query or fragment, servers that answer with an error page or HTML,
and emrun's own stores read over HTTP as they read locally."""

from __future__ import annotations

import http.server
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_remote_volumes import IMAGE, served, serving, tensorstore, write_n5
from typer.testing import CliRunner

from emrun.cli import app
from emrun.io import VolumeError, open_volume, split_volume_path
from emrun.io.write import write_volume


@contextmanager
def answering(status: int, body: bytes, content_type: str = "text/html") -> Iterator[str]:
    """A local HTTP server answering every GET with `status` and `body`; yields its URL."""

    class Fixed(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Fixed) as url:
        yield url


def one_line_exit_2(args: list[str]) -> str:
    """Run the CLI; assert exit 2 with one line on stderr and no traceback; return it."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


@pytest.mark.parametrize("path", ["", "  ", "http://", "precomputed://", "gs:///"])
def test_a_path_that_names_nothing_says_so(tmp_path: Path, path: str) -> None:
    """`--input "$UNSET"` printed "error: : no such file or directory"."""
    with pytest.raises(VolumeError, match=r"names no volume") as info:
        open_volume(path)
    assert not str(info.value).startswith(":")
    line = one_line_exit_2(["data", "convert", path, str(tmp_path / "o.zarr")])
    assert "names no volume" in line


@pytest.mark.parametrize(("spec", "expected"), [
    ("vol.zarr/./raw", ("vol.zarr", "raw")),
    ("vol.zarr/raw/.", ("vol.zarr", "raw")),
    ("a/vol.zarr/g/../raw", ("a/vol.zarr", "raw")),
    ("vol.zarr/..", (".", None)),
    ("a/vol.zarr/../other.zarr/raw", ("a/other.zarr", "raw")),
    ("./vol.zarr/raw", ("./vol.zarr", "raw")),  # dots before the container stay as typed
    ("../up/vol.n5/raw", ("../up/vol.n5", "raw")),
    ("http://host/v.zarr/./raw", ("http://host/v.zarr", "raw")),
    ("precomputed://gs://b/v.zarr/x/../raw", ("precomputed://gs://b/v.zarr", "raw")),
])
def test_dot_segments_inside_a_container_are_resolved(spec: str,
                                                      expected: tuple[str, str | None]) -> None:
    assert split_volume_path(spec) == expected


def test_dot_segments_open_the_array_they_name(tmp_path: Path) -> None:
    """zarr refused "vol.zarr/./raw" ("contains '.' or '..' segments"), N5 "Invalid key"."""
    group = zarr.open_group(tmp_path / "vol.zarr", mode="w")
    group.create_group("g").create_array("raw", data=IMAGE)
    for path in ("vol.zarr/./g/raw", "vol.zarr/g/../g/raw", "other.zarr/../vol.zarr/g/raw"):
        np.testing.assert_array_equal(open_volume(tmp_path / path).read(), IMAGE)
    tensorstore()
    write_n5(tmp_path / "v.n5/raw", IMAGE, {})
    np.testing.assert_array_equal(open_volume(tmp_path / "v.n5/./raw").read(), IMAGE)


@pytest.mark.parametrize("tail", ["/vol.zarr/raw?token=abc", "/pc?token=abc", "/v.n5/raw#frag",
                                  "/#!{\"layers\":[]}"])
def test_a_url_with_a_query_or_fragment_is_refused_as_such(tmp_path: Path, tail: str) -> None:
    """The query went into each file's path ("/pcinfo?token=abc/"), so a volume that was
    there was reported missing ("no volume there: no info file")."""
    tensorstore()
    with served(tmp_path) as url:
        with pytest.raises(VolumeError, match=r"query string \(\?\.\.\.\) or fragment"):
            open_volume(url + tail)
        line = one_line_exit_2(["data", "convert", url + tail, str(tmp_path / "o.zarr")])
    assert "query string" in line and not (tmp_path / "o.zarr").exists()


def test_a_server_error_is_one_short_line_without_its_page(tmp_path: Path) -> None:
    """A 500 answer quoted the server's whole HTML page, escaped, in the message."""
    tensorstore()
    page = b"<!DOCTYPE HTML><html><head><title>Error response</title></head><body>" + \
        b"<p>" * 200 + b"</body></html>"
    with answering(500, page) as url:
        for path in (f"{url}/pc", f"{url}/vol.zarr/raw", f"{url}/v.n5/raw"):
            with pytest.raises(VolumeError, match=r"HTTP code 500") as info:
                open_volume(path)
            assert "<" not in str(info.value) and "http_response_body" not in str(info.value)


def test_a_web_page_instead_of_metadata_is_named(tmp_path: Path) -> None:
    """A server answering every path with a page (a login or a catch-all index) was "not
    valid JSON: Expecting value: line 1 column 1"."""
    tensorstore()
    with answering(200, b"\n  <html><body>Please log in</body></html>") as url:
        for path in (f"{url}/pc", f"{url}/vol.zarr/raw", f"{url}/v.n5/raw"):
            with pytest.raises(VolumeError, match=r"a web page \(HTML\), not JSON"):
                open_volume(path)


def emrun_store(tmp_path: Path) -> Path:
    """An emrun output store: an image and a uint8 segmentation, two levels each."""
    store = tmp_path / "s.zarr"
    ids = (IMAGE // 64).astype(np.uint8)
    write_volume(store, "raw", IMAGE, voxel_size=(40, 4, 4), levels=2)
    write_volume(store, "seg", ids, voxel_size=(40, 4, 4), label=True, levels=2)
    assert open_volume(store / "labels/seg").segmentation  # locally it is one
    return store


def test_a_served_label_image_is_a_segmentation(tmp_path: Path) -> None:
    tensorstore()
    emrun_store(tmp_path)
    with served(tmp_path) as url:
        assert open_volume(f"{url}/s.zarr/labels/seg").segmentation
        assert not open_volume(f"{url}/s.zarr/raw").segmentation


def test_a_served_store_opens_a_segmentation_by_its_short_name(tmp_path: Path) -> None:
    tensorstore()
    emrun_store(tmp_path)
    with served(tmp_path) as url:
        seg = open_volume(f"{url}/s.zarr/seg")
        np.testing.assert_array_equal(seg.read(), (IMAGE // 64).astype(np.uint8))


def n5_dataset(folder: Path, data: np.ndarray, attrs: dict) -> None:
    """An N5 dataset of any rank written by tensorstore (axes reversed), extra attributes
    merged into its attributes.json afterwards, as other writers put them."""
    import json

    ts = tensorstore()
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)},
                     "metadata": {"dimensions": list(data.shape[::-1]),
                                  "blockSize": [4] * data.ndim, "dataType": str(data.dtype),
                                  "compression": {"type": "raw"}},
                     "create": True}).result()
    store[...] = data.T
    path = folder / "attributes.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **attrs}))


def test_n5_resolution_in_its_units(tmp_path: Path) -> None:
    n5_dataset(tmp_path / "v.n5/raw", IMAGE,
               {"resolution": [0.004, 0.004, 0.04], "units": ["um", "um", "um"]})
    assert open_volume(tmp_path / "v.n5/raw").voxel_size == pytest.approx((40.0, 4.0, 4.0))


def test_n5_channels_with_a_spatial_resolution(tmp_path: Path) -> None:
    affs = np.random.default_rng(0).random((3, *IMAGE.shape)).astype(np.float32)
    n5_dataset(tmp_path / "v.n5/affs", affs, {"resolution": [4, 4, 40], "offset": [4, 8, 40]})
    vol = open_volume(tmp_path / "v.n5/affs")
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset == (1, 2, 1)
    np.testing.assert_array_equal(vol.read(), affs)


def test_a_tensorstore_error_is_its_reason_without_the_spec_it_quotes(tmp_path: Path) -> None:
    """The reason came first, then the whole spec as escaped JSON, cut off at 300 characters
    (`[tensorstore_spec='{\\"context\\":{\\"cache_pool\\"...`)."""
    n5_dataset(tmp_path / "v.n5/raw", IMAGE, {"resolution": [4, 4]})
    with pytest.raises(VolumeError, match=r"resolution.*has length 2") as info:
        open_volume(tmp_path / "v.n5/raw")
    assert "tensorstore_spec" not in str(info.value) and "context" not in str(info.value)


def test_a_url_scheme_in_capitals_is_read(tmp_path: Path) -> None:
    """emrun took "HTTP://host/vol.zarr/raw" for a URL, tensorstore refused its scheme."""
    tensorstore()
    zarr.open_group(tmp_path / "v.zarr", mode="w").create_array("raw", data=IMAGE)
    with served(tmp_path) as url:
        vol = open_volume("HTTP" + url[4:] + "/v.zarr/raw")
        np.testing.assert_array_equal(vol.read(), IMAGE)


def test_an_n5_folder_without_the_suffix_is_named_as_n5(tmp_path: Path) -> None:
    """It was "neither a zarr store nor a folder of .tif/.tiff sections"; the suffix is what
    emrun knows N5 by."""
    n5_dataset(tmp_path / "data/raw", IMAGE, {})
    (tmp_path / "data/attributes.json").write_text('{"n5": "4.0.0"}')
    for path in ("data", "data/raw"):
        with pytest.raises(VolumeError, match=r"looks like N5 .* ending in \.n5"):
            open_volume(tmp_path / path)
    (tmp_path / "vol.n5").symlink_to(tmp_path / "data")
    np.testing.assert_array_equal(open_volume(tmp_path / "vol.n5/raw").read(), IMAGE)


STALLING_READ = """
import functools, http.server, sys, threading, time
import emrun.io.tensorstore_volume as tv
from emrun.io import VolumeError, open_volume

class Stalling(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # metadata answers; a chunk's request is taken and never answered
        if not self.path.endswith("/info"):
            time.sleep(600)
        return super().do_GET()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(Stalling, directory=sys.argv[1]))
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
tv.READ_RETRIES = {"max_retries": 1, "initial_delay": "0.1s", "max_delay": "0.1s"}
volume = open_volume(f"http://127.0.0.1:{server.server_address[1]}/pc")
try:
    volume.read()
except VolumeError as exc:
    print(exc)
"""


def test_a_read_from_a_server_that_stalls_ends_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that took a chunk's request and never answered held the read, and the job
    around it, forever; tensorstore gives a stalled transfer up when told a stall limit."""
    import os
    import subprocess
    import sys

    from test_remote_volumes import write_precomputed

    from emrun.io.tensorstore_volume import STALL_ENV, tensorstore

    write_precomputed(tmp_path / "pc", [IMAGE])
    (tmp_path / "stall.py").write_text(STALLING_READ)
    env = {**os.environ, "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "1"}  # the user's wins
    done = subprocess.run([sys.executable, str(tmp_path / "stall.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "/pc: reading [0:6, 0:10, 0:14] failed" in done.stdout
    assert "too slow" in done.stdout and len(done.stdout.strip().splitlines()) == 1
    for name in STALL_ENV:
        monkeypatch.delenv(name, raising=False)
    tensorstore("a volume")
    assert all(os.environ[name] == value for name, value in STALL_ENV.items())
