"""The hostile-input corpus for data files, arguments and output paths (see ``tests/corpus.py``).

``cases(root)`` builds every bad input under ``root`` (small on disk: a header declaring a huge
array or image is a few hundred bytes) and returns one :class:`~corpus.Case` per input. Every case
must end with exit code 2 and one ``error:`` line naming what is wrong, before anything is computed
or written. The model the commands are given is a freshly initialised ``mnist_cnn`` for 1x8x8
digits (its weights do not matter: every case is refused before a forward pass).

Kinds: ``npz`` (malformed archives and members), ``npy-header`` (headers that lie), ``labels``,
``image`` (image folders: pixel bombs, special files, symbolic links out), ``special-file``
(FIFOs, devices and sockets as data), ``aux-file`` (``filter --truth``, ``inspect-data
--provenance``), ``memory`` (the budget), ``argument`` (out-of-range values), ``usage`` (click's
own errors), ``output-path`` (outputs that cannot be written).
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from corpus import Case


# --- builders -------------------------------------------------------------------------------

def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def npy_header(descr: str, shape: tuple, fortran: bool = False) -> bytes:
    """An ``.npy`` version 1.0 header declaring ``descr`` / ``shape`` (no data after it)."""
    d = "{'descr': %r, 'fortran_order': %r, 'shape': %r, }" % (descr, fortran, shape)
    pad = 64 - (10 + len(d) + 1) % 64
    text = (d + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def write_zip(path: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]],
              compression: int = zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate names we write on purpose
        with zipfile.ZipFile(path, "w", compression) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def good_x(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8)).astype(np.float32)


def good_y(n: int = 6) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 10


def npz(path: Path, **arrays: np.ndarray) -> Path:
    members = [(f"{k}.npy", npy_bytes(v)) for k, v in arrays.items()]
    return write_zip(path, members)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` (8-bit grey) and whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def good_png(path: Path, size: int = 8) -> Path:
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((size, size)) * 255).astype(np.uint8), mode="L").save(path)
    return path


def image_folder(root: Path, name: str, *, extra: dict[str, object] | None = None) -> Path:
    """``root/name/{a,b}/`` with one good 8x8 PNG each; ``extra`` maps 'a/file.png' -> a builder."""
    d = root / name
    for c in ("a", "b"):
        (d / c).mkdir(parents=True, exist_ok=True)
        good_png(d / c / "0.png")
    for rel, build in (extra or {}).items():
        build(d / rel)  # type: ignore[operator]
    return d


def make_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def tiny_model(root: Path) -> Path:
    """A freshly initialised mnist_cnn for 1x8x8 digits, saved as a trojanscope model directory.

    Built in a child interpreter: the corpus test forks its process per case, and a process that
    has run torch operators (thread pools started) must not be forked."""
    import subprocess
    import sys

    out = root / "model"
    if not (out / "model.json").is_file():
        code = ("import sys; from trojanscope.models import ModelSpec, create_model, save_model; "
                "save_model(create_model('mnist_cnn', input_shape=(1, 8, 8), num_classes=10, seed=0), sys.argv[1], "
                "ModelSpec('mnist_cnn', (1, 8, 8), 10))")
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    return out


# --- the corpus -------------------------------------------------------------------------------

def cases(root: Path) -> list[Case]:
    """Build every bad data file / argument / output path under ``root``; one Case each."""
    root = Path(root)
    d = root / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    model = str(tiny_model(root))
    out: list[Case] = []

    def ev(cid: str, kind: str, data: Path | str, match: str, *extra: str) -> None:
        out.append(Case(cid, kind, ["evaluate", model, "--data", str(data), *extra], match))

    x, y = good_x(), good_y()
    # -- npz: the archive and its members
    ev("npz-member-not-array", "npz", write_zip(d / "notarray.npz", [("x.npy", b"hello, not an array"),
                                                                    ("y.npy", npy_bytes(y))]), "not a numpy array file")
    ev("npz-member-text", "npz", write_zip(d / "text.npz", [("x.npy", npy_bytes(x)), ("y.npy", npy_bytes(y)),
                                                            ("readme.txt", b"hi")]), "not an array file")
    ev("npz-member-unknown", "npz", npz(d / "unknown.npz", x=x, y=y, weights=y), "'x' and 'y'")
    np.save(d / "single.npy", x)
    os.replace(d / "single.npy", d / "single.npz")
    ev("npy-named-npz", "npz", d / "single.npz", "single .npy")
    (d / "garbage.npz").write_bytes(os.urandom(256))
    ev("npz-not-zip", "npz", d / "garbage.npz", "not an .npz")
    (d / "cut.npz").write_bytes(npz(d / "tmp.npz", x=x, y=y).read_bytes()[:300])
    (d / "tmp.npz").unlink()
    ev("npz-truncated-zip", "npz", d / "cut.npz", "cannot read")
    ev("npz-duplicate-member", "npz", write_zip(d / "dup.npz", [("x.npy", npy_bytes(x)), ("y.npy", npy_bytes(y)),
                                                                ("x.npy", npy_bytes(x))]), "two members")
    ev("npz-unsafe-path", "npz", write_zip(d / "dotdot.npz", [("../x.npy", npy_bytes(x)), ("y.npy", npy_bytes(y))]),
       "unsafe path")
    link = zipfile.ZipInfo("x.npy")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    ev("npz-symlink-member", "npz", write_zip(d / "link.npz", [(link, b"/etc/passwd"), ("y.npy", npy_bytes(y))]),
       "symbolic link")
    ev("npz-missing-y", "npz", npz(d / "noy.npz", x=x), "'x' and 'y'")
    ev("npz-0d-x", "npz", npz(d / "zerod.npz", x=np.array(0.5, np.float32), y=y), "0-d")
    ev("npz-x-rank-2", "npz", npz(d / "rank2.npz", x=x.reshape(6, 64), y=y), "(N, C, H, W)")
    ev("npz-x-rank-5", "npz", npz(d / "rank5.npz", x=x[:, None], y=y), "(N, C, H, W)")
    xn = x.copy()
    xn[2, 0, 3, 3] = np.nan
    ev("npz-nan-x", "npz", npz(d / "nan.npz", x=xn, y=y), "NaN")
    xi = x.copy()
    xi[0, 0, 0, 0] = np.inf
    ev("npz-inf-x", "npz", npz(d / "inf.npz", x=xi, y=y), "infinite")
    ev("npz-x-out-of-range", "npz", npz(d / "range.npz", x=x * 255, y=y), "[0, 1]")
    ev("npz-x-int32", "npz", npz(d / "int32x.npz", x=(x * 100).astype(np.int32), y=y), "uint8 or float")
    ev("npz-x-complex", "npz", npz(d / "complexx.npz", x=x.astype(np.complex64), y=y), "uint8 or float")
    ev("npz-object-x", "npz", npz(d / "objx.npz", x=np.array([{"a": 1}] * 6, dtype=object), y=y), "Python objects")
    ev("npz-empty", "npz", npz(d / "empty.npz", x=x[:0], y=y[:0]), "empty")
    ev("npz-zero-width", "npz", npz(d / "zerow.npz", x=np.zeros((6, 1, 0, 8), np.float32), y=y), "empty")
    ev("npz-length-mismatch", "npz", npz(d / "mismatch.npz", x=x, y=y[:4]), "samples")
    # -- labels
    ev("labels-uint32", "labels", npz(d / "u32.npz", x=x, y=y.astype(np.uint32)), "integers")
    ev("labels-uint64", "labels", npz(d / "u64.npz", x=x, y=np.full(6, 2**63 + 5, np.uint64)), "integers")
    ev("labels-float", "labels", npz(d / "fy.npz", x=x, y=y.astype(np.float32) + 0.5), "integers")
    ev("labels-nan", "labels", npz(d / "nany.npz", x=x, y=np.full(6, np.nan)), "integers")
    ev("labels-negative", "labels", npz(d / "negy.npz", x=x, y=y - 3), "negative")
    ev("labels-huge", "labels", npz(d / "hugey.npz", x=x, y=np.full(6, 10**12, np.int64)), "out of range")
    ev("labels-over-model", "labels", npz(d / "overy.npz", x=x, y=np.full(6, 11, np.int64)), "out of range")
    ev("labels-2d", "labels", npz(d / "y2d.npz", x=x, y=y.reshape(2, 3)), "1-D")
    ev("labels-bool", "labels", npz(d / "booly.npz", x=x, y=(y > 3)), "integers")
    # -- .npy headers that lie about their data
    ev("npy-declares-huge", "npy-header", write_zip(d / "huge.npz", [("x.npy", npy_header("<f4", (10**6, 3, 1024, 1024))),
                                                                     ("y.npy", npy_bytes(y))]), "memory budget")
    ev("npy-declares-more-than-held", "npy-header",
       write_zip(d / "short.npz", [("x.npy", npy_header("<f4", (600, 1, 8, 8)) + b"\0" * 1024), ("y.npy", npy_bytes(y))]),
       "declares")
    ev("npy-object-descr", "npy-header", write_zip(d / "objdescr.npz", [("x.npy", npy_header("|O", (6,)) + b"\0" * 48),
                                                                        ("y.npy", npy_bytes(y))]), "Python objects")
    ev("npy-structured-descr", "npy-header",
       write_zip(d / "struct.npz", [("x.npy", npy_header([("a", "<f4")], (6,)) + b"\0" * 24),  # type: ignore[arg-type]
                                    ("y.npy", npy_bytes(y))]), "structured")
    ev("npy-header-code", "npy-header",
       write_zip(d / "codehdr.npz", [("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", 54)
                                      + b"__import__('os').system('touch /tmp/pwned_npy')      \n"),
                                     ("y.npy", npy_bytes(y))]), "not a numpy array file")
    ev("npy-negative-shape", "npy-header",
       write_zip(d / "negshape.npz", [("x.npy", npy_header("<f4", (-6, 1, 8, 8))), ("y.npy", npy_bytes(y))]),
       "invalid shape")
    # -- compression bombs and the memory budget
    bomb = d / "bomb.npz"
    n_bomb = (64 << 20) // 256  # 64 MiB of float32 zeros in (N, 1, 8, 8): about 65 KB compressed
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(npy_header("<f4", (n_bomb, 1, 8, 8)))
            zero = b"\0" * (8 << 20)
            left = n_bomb * 256
            while left:
                f.write(zero[:min(left, len(zero))])
                left -= min(left, len(zero))
        zf.writestr("y.npy", npy_bytes(np.zeros(n_bomb, np.uint8)), compress_type=zipfile.ZIP_DEFLATED)
    ev("npz-zip-bomb", "memory", bomb, "ratio")
    out.append(Case("max-memory-small-npz", "memory", ["--max-memory", "16K", "evaluate", model, "--data",
                                                       str(npz(d / "ok.npz", x=good_x(60), y=good_y(60)))],
                    "memory budget"))
    out.append(Case("max-memory-1k", "memory", ["--max-memory", "1K", "evaluate", model, "--data", str(d / "ok.npz")],
                    "memory budget"))
    # -- image folders
    ev("png-declares-20000x20000", "image", image_folder(d, "bigpng", extra={"a/1.png": lambda p: png_header_only(p, 20000, 20000)}),
       "Mpx")
    ev("png-over-178-mpx", "image", image_folder(d, "pilbomb", extra={"a/1.png": lambda p: png_header_only(p, 14000, 13000)}),
       "Mpx")
    ev("png-45-mpx", "image", image_folder(d, "midpng", extra={"b/1.png": lambda p: png_header_only(p, 9000, 5000)}),
       "Mpx")
    ev("png-corrupt", "image", image_folder(d, "corrupt", extra={"a/1.png": lambda p: p.write_bytes(b"\x89PNG junk")}),
       "cannot read image")
    ev("png-truncated", "image", image_folder(d, "trunc", extra={"a/1.png": lambda p: p.write_bytes(
        good_png(d / "t.png", 64).read_bytes()[:80])}), "cannot read image")
    ev("image-fifo", "image", image_folder(d, "fifo", extra={"a/1.png": lambda p: os.mkfifo(p)}), "FIFO")
    ev("image-socket", "image", image_folder(d, "sock", extra={"b/1.png": make_socket}), "socket")
    (root / "outside.png").write_bytes(good_png(d / "o.png").read_bytes())
    ev("image-symlink-out", "image", image_folder(d, "linkout", extra={"a/1.png": lambda p: p.symlink_to(root / "outside.png")}),
       "out of the dataset folder")
    ev("image-symlink-device", "image", image_folder(d, "linkdev", extra={"a/1.png": lambda p: p.symlink_to("/dev/zero")}),
       "out of the dataset folder")
    (root / "outside_class").mkdir(exist_ok=True)
    good_png(root / "outside_class" / "0.png")
    ev("class-dir-symlink-out", "image", image_folder(d, "classout", extra={"c": lambda p: p.symlink_to(root / "outside_class")}),
       "out of the dataset folder")
    ev("image-symlink-loop", "image", image_folder(d, "loop", extra={"a/1.png": lambda p: p.symlink_to(p)}),
       "symbolic link")
    (d / "noclasses").mkdir(exist_ok=True)
    (d / "noclasses" / "x.png").write_bytes(good_png(d / "o2.png").read_bytes())
    ev("folder-no-classes", "image", d / "noclasses", "no class")
    (d / "noimages" / "a").mkdir(parents=True, exist_ok=True)
    ev("folder-no-images", "image", d / "noimages", "no images")
    # -- special files as data
    fifo = d / "data_fifo.npz"
    if not fifo.exists():
        os.mkfifo(fifo)
    ev("data-fifo", "special-file", fifo, "FIFO")
    ev("data-fifo-no-suffix", "special-file", _fifo(d / "data_fifo"), "FIFO")
    ev("data-dev-zero", "special-file", "/dev/zero", "device")
    sock = d / "data.sock"
    if not sock.exists():
        make_socket(sock)
    ev("data-socket", "special-file", sock, "socket")
    ev("data-single-npy", "special-file", _save(d / "plain.npy", x), "single .npy")
    ev("data-missing", "special-file", d / "nothing_here.npz", "not found")
    # -- auxiliary inputs: filter --truth, inspect-data --provenance, filter's --data
    good = d / "ok.npz"
    filt = ["filter", model, "--fit", "digits", "--data", str(good), "-p", "n_overlays=2"]
    out.append(Case("filter-object-data", "aux-file", ["filter", model, "--fit", "digits", "--data", str(d / "objx.npz")],
                    "Python objects"))
    objnpz = write_zip(d / "objtruth.npz", [("x.npy", npy_bytes(good_x(60))), ("y.npy", npy_bytes(good_y(60))),
                                            ("triggered.npy", npy_bytes(np.array([None] * 60, dtype=object)))])
    out.append(Case("filter-object-truth-in-npz", "aux-file",
                    ["filter", model, "--fit", "digits", "--data", str(objnpz), "-p", "n_overlays=2"], "Python objects"))
    out.append(Case("filter-truth-object-npy", "aux-file",
                    [*filt, "--truth", str(_save(d / "objtruth.npy", np.array([{}] * 60, dtype=object)))], "Python objects"))
    (d / "truth.json").write_text(json.dumps([{"a": 1}] * 60))
    out.append(Case("filter-truth-json-objects", "aux-file", [*filt, "--truth", str(d / "truth.json")], "0 or 1"))
    out.append(Case("filter-truth-fifo", "aux-file", [*filt, "--truth", str(_fifo(d / "truth_fifo.npy"))], "FIFO"))
    out.append(Case("provenance-object-npy", "aux-file",
                    ["inspect-data", model, "--data", str(good), "--method", "provenance", "--provenance",
                     str(_save(d / "objgroups.npy", np.array(["a"] * 60, dtype=object)))], "Python objects"))
    out.append(Case("provenance-fifo", "aux-file",
                    ["inspect-data", model, "--data", str(good), "--method", "provenance", "--provenance",
                     str(_fifo(d / "groups_fifo.npy"))], "FIFO"))
    # -- trigger files (--trigger PATH.safetensors, rgba:PNG, blend:IMAGE)
    base = ["evaluate", model, "--data", "digits"]
    (d / "garbage.safetensors").write_bytes(os.urandom(100))
    out.append(Case("trigger-garbage-safetensors", "aux-file",
                    [*base, "--trigger", str(d / "garbage.safetensors"), "--target", "0"], "trigger file"))
    out.append(Case("trigger-fifo", "aux-file", [*base, "--trigger", str(_fifo(d / "trig_fifo.safetensors")),
                                                 "--target", "0"], "FIFO"))
    out.append(Case("trigger-png-bomb", "aux-file",
                    [*base, "--trigger", f"rgba:{png_header_only(d / 'trig_big.png', 20000, 20000)}", "--target", "0"],
                    "Mpx"))
    out.append(Case("trigger-blend-fifo", "aux-file",
                    [*base, "--trigger", f"blend:{_fifo(d / 'blend_fifo.png')}", "--target", "0"], "FIFO"))
    # -- arguments
    arg = [
        ("batch-size-0", [*base, "--batch-size", "0"], "--batch-size"),
        ("batch-size-negative", [*base, "--batch-size", "-1"], "--batch-size"),
        ("device-bogus", [*base, "--device", "bogus"], "--device"),
        ("device-cuda-99", [*base, "--device", "cuda:99"], "cuda"),
        ("seed-negative", [*base, "--seed", "-1"], "--seed"),
        ("target-negative", [*base, "--trigger", "square:3", "--target", "-1"], "--target"),
        ("num-classes-0", [*base, "--num-classes", "0"], "--num-classes"),
        ("input-shape-zero", [*base, "--input-shape", "0,8,8"], "--input-shape"),
        ("trigger-bogus", [*base, "--trigger", "circle:3", "--target", "0"], "trigger"),
        ("train-epochs-0", ["train", "--data", "digits", "--epochs", "0", "--out", str(root / "o_train")], "--epochs"),
        ("train-lr-nan", ["train", "--data", "digits", "--lr", "nan", "--out", str(root / "o_train")], "--lr"),
        ("train-lr-0", ["train", "--data", "digits", "--lr", "0", "--out", str(root / "o_train")], "--lr"),
        ("poison-rate-0", ["poison", "--data", "digits", "--rate", "0", "--out", str(root / "o_p")], "--rate"),
        ("poison-rate-1.5", ["poison", "--data", "digits", "--rate", "1.5", "--out", str(root / "o_p")], "--rate"),
        ("bench-max-cells-negative", ["bench", "--quick", "--max-cells", "-1", "--out", str(root / "o_b")], "--max-cells"),
        ("bench-threads-0", ["bench", "--quick", "--threads", "0", "--out", str(root / "o_b")], "--threads"),
        ("scan-n-samples-0", ["scan", model, "--data", "digits", "--n-samples", "0"], "--n-samples"),
        ("scan-epochs-0", ["scan", model, "--data", "digits", "--epochs", "0"], "--epochs"),
        ("filter-frr-1", ["filter", model, "--fit", "digits", "--data", "digits", "--frr", "1"], "--frr"),
        ("filter-show-negative", ["filter", model, "--fit", "digits", "--data", "digits", "--show", "-3"], "--show"),
        ("inspect-epsilon-2", ["inspect-data", model, "--data", "digits", "--method", "spectral", "--epsilon", "2"],
         "--epsilon"),
        ("max-memory-bogus", ["--max-memory", "lots", *base], "--max-memory"),
        ("max-memory-zero", ["--max-memory", "0", *base], "--max-memory"),
    ]
    out += [Case(f"arg-{cid}", "argument", argv, match) for cid, argv, match in arg]
    usage = [
        ("unknown-option", [*base, "--no-such-option"], "No such option"),
        ("missing-argument", ["evaluate"], "Missing argument"),
        ("missing-option", ["scan", model], "Missing option"),
        ("bad-choice", ["scan", model, "--data", "digits", "--mode", "bogus"], "bogus"),
        ("unknown-command", ["no-such-command"], "No such command"),
        ("not-an-int", [*base, "--batch-size", "many"], "--batch-size"),
        ("extra-argument", [*base, "surplus"], "unexpected extra argument"),
    ]
    out += [Case(f"usage-{cid}", "usage", argv, match) for cid, argv, match in usage]
    # -- output paths (each would otherwise be a quick, successful run)
    (root / "a_file").write_text("not a folder")
    (root / "a_dir").mkdir(exist_ok=True)
    outp = [
        ("json-under-file", [*base, "--json", str(root / "a_file" / "r.json")], "not a directory"),
        ("json-dev-full", [*base, "--json", "/dev/full"], "not a regular file"),
        ("json-is-dir", [*base, "--json", str(root / "a_dir")], "is a directory"),
        ("json-unwritable", [*base, "--json", "/proc/trojanscope-test.json"], "cannot write"),
        ("train-out-under-file", ["train", "--data", "digits", "--epochs", "1", "--out", str(root / "a_file" / "m")],
         "not a directory"),
        ("train-out-is-file", ["train", "--data", "digits", "--epochs", "1", "--out", str(root / "a_file")],
         "is a file"),
        ("scan-report-under-file", ["scan", model, "--data", "digits", "--report", str(root / "a_file" / "r.html")],
         "not a directory"),
        ("scan-heatmap-is-dir", ["scan", model, "--data", "digits", "--heatmap", str(root / "a_dir")], "is a directory"),
        ("report-out-dev-full", ["report", str(root / "a_dir"), "--out", "/dev/full"], "not a regular file"),
        ("repair-out-unwritable", ["repair", model, "--method", "fine-prune", "--data", "digits", "--out",
                                   "/proc/trojanscope-test"], "cannot write"),
    ]
    out += [Case(f"out-{cid}", "output-path", argv, match) for cid, argv, match in outp]
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return out


def _fifo(path: Path) -> Path:
    if not path.exists():
        os.mkfifo(path)
    return path


def _save(path: Path, a: np.ndarray) -> Path:
    np.save(path, a, allow_pickle=True)
    return path
