"""Loaders: Omniglot, Lake runs, image folders, digits, data paths, download list."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data import sources
from fewshot.data.lake import LakeRun, load_lake_runs
from fewshot.data.sources import (
    load_digits,
    load_image_folder,
    load_omniglot,
    load_unlabeled_folder,
    omniglot_downloads,
    resolve_data_path,
)
from fewshot.errors import DataError, FewshotError

# ----------------------------------------------------------------- fake data

# Written in unsorted order on purpose: the loader must sort.
ALPHABETS = {"Greek": ["character02", "character01"], "Aramaic": ["character01", "character02"]}
DRAWERS = 3


def _glyph(slot: int, size: int = 56) -> Image.Image:
    """Black ink on white, like Omniglot: a 2px-aligned block whose position encodes ``slot``."""
    a = np.full((size, size), 255, np.uint8)
    r = 2 * (slot % 12) + 4
    a[r : r + 8, 10:30] = 0  # black block, aligned to the 2x downsampling grid
    return Image.fromarray(a, "L").convert("1")  # the real release stores 1-bit PNGs


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_files(top: str = "images_background_small1/") -> dict[str, bytes]:
    files = {}
    slot = 0
    for alphabet, characters in ALPHABETS.items():
        for character in characters:
            for d in range(1, DRAWERS + 1):
                files[f"{top}{alphabet}/{character}/{slot:04d}_{d:02d}.png"] = _png(_glyph(slot))
            slot += 1
    return files


def _write_zip(path: Path, files: dict[str, bytes], dirs: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        written = set()
        for name, data in files.items():
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i]) + "/"
                if dirs and d not in written:
                    z.writestr(d, b"")
                    written.add(d)
            z.writestr(name, data)
    return path


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("omni")
    files = _omniglot_files()
    return {
        "zip": _write_zip(tmp / "images_background_small1.zip", files),
        "parent": _write_folder(tmp / "unzipped", files),
        "inner": tmp / "unzipped" / "images_background_small1",
    }


def _lake_files(padded: dict[str, bool], perms: dict[str, list[int]]) -> dict[str, bytes]:
    """Runs whose class k image has a black row at 2k and whose test item i belongs to
    class perms[run][i] (plus a dot, so item and class images differ)."""
    files = {}
    for run, perm in perms.items():
        fmt = "{:02d}" if padded[run] else "{}"
        lines = []
        for k in range(20):
            a = np.full((40, 40), 255, np.uint8)
            a[2 * k : 2 * k + 2, :] = 0
            files[f"{run}/training/class{fmt.format(k + 1)}.png"] = _png(Image.fromarray(a))
        for i, k in enumerate(perm):
            a = np.full((40, 40), 255, np.uint8)
            a[2 * k : 2 * k + 2, 4:36] = 0
            a[38:40, 2 * i : 2 * i + 2] = 0
            item = f"{run}/test/item{fmt.format(i + 1)}.png"
            files[item] = _png(Image.fromarray(a))
            lines.append(f"{item} {run}/training/class{fmt.format(k + 1)}.png")
        files[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    return files


PERMS = {
    "run01": [(7 * i + 3) % 20 for i in range(20)],
    "run02": [(19 - i) for i in range(20)],
}
PADDED = {"run01": True, "run02": False}  # run02 uses item1..item20: order must be numeric


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lake")
    files = _lake_files(PADDED, PERMS)
    return {
        "zip": _write_zip(tmp / "all_runs.zip", files, dirs=False),
        "folder": _write_folder(tmp / "all_runs", files),
        "parent": _write_folder(tmp / "parent" / "all_runs", files).parent,
    }


def _raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert match in msg, msg
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------- omniglot


def test_omniglot_zip_shapes_names_and_inversion(omni):
    s = load_omniglot(omni["zip"], image_size=28)
    assert s.images.shape == (12, 1, 28, 28) and s.images.dtype == torch.float32
    assert s.labels.dtype == torch.int64
    assert s.classes == [
        "Aramaic/character01",
        "Aramaic/character02",
        "Greek/character01",
        "Greek/character02",
    ]
    assert s.groups == ["Aramaic", "Aramaic", "Greek", "Greek"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    # White paper -> 0, black ink -> 1 (the block is aligned to the 2x grid: exactly 1).
    img = s.images[0, 0]
    assert img[0, 0] == 0.0
    assert img.max() == pytest.approx(1.0)
    # Greek/character01 was written with slot 1 -> ink rows 6..13, cols 10..29 at 56px
    # -> rows 3..6, cols 5..14 at 28px, exactly (area resampling keeps the ink mass).
    g1 = s.images[6, 0]
    assert torch.all(g1[3:7, 5:15] == 1.0) and float(g1.sum()) == pytest.approx(40.0, abs=1e-4)


def test_omniglot_zip_and_folders_are_identical(omni):
    a = load_omniglot(omni["zip"])
    for key in ("parent", "inner"):
        b = load_omniglot(omni[key])
        assert b.classes == a.classes and b.groups == a.groups
        assert torch.equal(b.labels, a.labels)
        assert torch.equal(b.images, a.images)


def test_omniglot_subset_and_other_size(omni, tmp_path):
    sub = tmp_path / "sub"
    shutil.copytree(omni["inner"] / "Greek", sub / "Greek")
    (sub / ".DS_Store").write_bytes(b"junk")
    s = load_omniglot(sub, image_size=14)
    assert s.images.shape == (6, 1, 14, 14)
    assert s.classes == ["Greek/character01", "Greek/character02"]


def test_omniglot_errors(omni, tmp_path):
    _raises(str(tmp_path / "nope.zip"), load_omniglot, tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    _raises("expected the layout ALPHABET/characterNN", load_omniglot, tmp_path / "empty")
    nozip = _write_zip(tmp_path / "noimg.zip", {"top/readme.txt": b"hi"})
    msg = _raises("no images", load_omniglot, nozip)
    assert "noimg.zip" in msg and "ALPHABET/characterNN" in msg
    txt = tmp_path / "x.txt"
    txt.write_text("not data")
    _raises("neither a folder nor a zip", load_omniglot, txt)

    files = _omniglot_files()
    files["images_background_small1/Greek/character03/0394_01.png"] = b"\x89PNG broken"
    bad = _write_zip(tmp_path / "bad.zip", files)
    msg = _raises("cannot read image 'images_background_small1/Greek/character03/0394_01.png'", load_omniglot, bad)
    assert "bad.zip" in msg
    badf = _write_folder(tmp_path / "badf", files)
    _raises("Greek/character03/0394_01.png", load_omniglot, badf)

    # Two image sets side by side: ambiguous, name both.
    two = tmp_path / "two"
    _write_folder(two, _omniglot_files("images_background/") | _omniglot_files("images_evaluation/"))
    msg = _raises("several image sets", load_omniglot, two)
    assert "images_background" in msg and "images_evaluation" in msg

    # An empty character folder.
    holey = tmp_path / "holey"
    shutil.copytree(omni["inner"], holey)
    (holey / "Greek" / "character07").mkdir()
    _raises("Greek/character07", load_omniglot, holey)

    # One bad image among many: the error names that file.
    many = {f"A/character01/{i:03d}.png": _png(_glyph(i)) for i in range(80)}
    many["A/character01/050.png"] = b"truncated"
    _raises("cannot read image 'A/character01/050.png'", load_omniglot, _write_zip(tmp_path / "many.zip", many))

    # Images at the wrong depth.
    flat = _write_folder(tmp_path / "flat", {"a/b.png": _png(_glyph(0))})
    _raises("unexpected file 'a/b.png'", load_omniglot, flat)


def test_data_error_is_a_fewshot_error():
    assert issubclass(DataError, FewshotError) and issubclass(DataError, ValueError)


# ------------------------------------------------------------------ lake runs


def test_lake_runs_parse(lake):
    runs = load_lake_runs(lake["zip"], image_size=20)
    assert [r.name for r in runs] == ["run01", "run02"]
    for r in runs:
        assert isinstance(r, LakeRun)
        assert r.train_images.shape == (20, 1, 20, 20) and r.test_images.shape == (20, 1, 20, 20)
        assert r.answers.dtype == torch.int64 and r.answers.tolist() == PERMS[r.name]
        # Class k has ink (1 after inversion) on row k at 20px; test item i on row answers[i].
        for k in range(20):
            assert torch.all(r.train_images[k, 0, k] == 1.0)
        for i, k in enumerate(r.answers.tolist()):
            assert r.test_images[i, 0, k, 5] == 1.0
        assert not torch.equal(r.train_images[r.answers], r.test_images)


def test_lake_zip_and_folders_are_identical(lake):
    a = load_lake_runs(lake["zip"])
    for key in ("folder", "parent"):
        b = load_lake_runs(lake[key])
        assert [r.name for r in b] == [r.name for r in a]
        for x, y in zip(a, b):
            assert torch.equal(x.train_images, y.train_images)
            assert torch.equal(x.test_images, y.test_images)
            assert torch.equal(x.answers, y.answers)


def test_lake_errors(tmp_path):
    good = _lake_files({"run01": True}, {"run01": PERMS["run01"]})
    _raises(str(tmp_path / "missing"), load_lake_runs, tmp_path / "missing")
    _raises("no Lake runs", load_lake_runs, _write_folder(tmp_path / "none", {"x/readme.txt": b""}))

    files = dict(good)
    files["run01/class_labels.txt"] = good["run01/class_labels.txt"].replace(
        b"run01/training/class04.png", b"run01/training/class44.png"
    )
    _raises("names 'run01/training/class44.png'", load_lake_runs, _write_zip(tmp_path / "a.zip", files))

    files = dict(good)
    files["run01/class_labels.txt"] = b"\n".join(good["run01/class_labels.txt"].splitlines()[1:])
    _raises("test item 'run01/test/item01.png' has no line", load_lake_runs, _write_zip(tmp_path / "b.zip", files))

    files = dict(good)
    files["run01/class_labels.txt"] = b"run01/test/item01.png\n"
    _raises("line 1 of 'run01/class_labels.txt'", load_lake_runs, _write_zip(tmp_path / "c.zip", files))

    files = dict(good) | {"run02/training/class01.png": good["run01/training/class01.png"]}
    _raises("'run02' in", load_lake_runs, _write_folder(tmp_path / "d", files))

    files = dict(good)
    files["run01/test/item05.png"] = b"garbage"
    _raises("cannot read image 'run01/test/item05.png'", load_lake_runs, _write_zip(tmp_path / "e.zip", files))


# ------------------------------------------------------------- image folders


def _solid(w: int, h: int, color) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_image_folder_classes_extensions_and_hidden(tmp_path):
    root = tmp_path / "labeled"
    _save(_solid(12, 12, (0, 0, 0)), root / "cat" / "a.PNG")
    _save(_solid(12, 12, (0, 0, 0)), root / "cat" / "nested" / "b.jpg")
    _save(_solid(12, 12, (255, 255, 255)), root / "dog" / "c.bmp")
    _save(_solid(12, 12, (255, 255, 255)), root / "dog" / "d.gif")
    _save(_solid(12, 12, (255, 255, 255)), root / "dog" / "e.webp")
    _save(_solid(12, 12, (9, 9, 9)), root / "dog" / ".hidden.png")
    _save(_solid(12, 12, (9, 9, 9)), root / ".cache" / "x.png")
    (root / "dog" / "notes.txt").write_text("ignored")
    s = load_image_folder(root, image_size=6)
    assert s.classes == ["cat", "dog"] and s.groups is None
    assert s.labels.tolist() == [0, 0, 1, 1, 1]
    assert s.images.shape == (5, 1, 6, 6)
    assert torch.allclose(s.images[:2], torch.zeros(2, 1, 6, 6), atol=0.02)
    assert torch.allclose(s.images[2:], torch.ones(3, 1, 6, 6), atol=0.02)
    inv = load_image_folder(root, image_size=6, channels=3, invert=True)
    assert inv.images.shape == (5, 3, 6, 6)
    assert torch.allclose(inv.images, 1 - load_image_folder(root, 6, channels=3).images)


def test_non_square_is_centre_cropped(tmp_path):
    # 60x20: red | green | blue thirds; keeping the central square leaves only green.
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20, 0] = 255
    a[:, 20:40, 1] = 255
    a[:, 40:, 2] = 255
    _save(Image.fromarray(a), tmp_path / "flat" / "wide.png")
    _save(Image.fromarray(a.transpose(1, 0, 2).copy()), tmp_path / "flat" / "tall.png")
    s = load_unlabeled_folder(tmp_path / "flat", image_size=10, channels=3)
    assert s.images.shape == (2, 3, 10, 10)
    expect = torch.zeros(3, 10, 10)
    expect[1] = 1.0
    assert torch.allclose(s.images[0], expect) and torch.allclose(s.images[1], expect)


def test_transparency_becomes_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 0, 255))
    _save(img, tmp_path / "t" / "a.png")
    s = load_unlabeled_folder(tmp_path / "t", image_size=8, invert=True)
    assert s.images[0, 0, 0, 0] == 1.0 and s.images[0, 0, 4, 4] == 0.0


def test_unlabeled_folder(tmp_path):
    root = tmp_path / "u"
    _save(_solid(9, 9, (255, 255, 255)), root / "b.png")
    _save(_solid(9, 9, (0, 0, 0)), root / "a.JPEG")
    _save(_solid(9, 9, (0, 0, 0)), root / "sub" / "ignored.png")
    s = load_unlabeled_folder(root, image_size=4)
    assert s.images.shape == (2, 1, 4, 4)
    assert s.labels.tolist() == [-1, -1] and s.classes == [] and not s.labeled
    assert float(s.images[0].max()) < 0.05 and float(s.images[1].min()) > 0.95  # sorted: a, b


def test_image_folder_errors(tmp_path):
    _raises(str(tmp_path / "nope"), load_image_folder, tmp_path / "nope", 8)
    _raises(str(tmp_path / "nope"), load_unlabeled_folder, tmp_path / "nope", 8)
    root = tmp_path / "l"
    _save(_solid(5, 5, (0, 0, 0)), root / "cat" / "a.png")
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    _raises("class folder 'dog'", load_image_folder, root, 8)
    flat = tmp_path / "flat"
    _save(_solid(5, 5, (0, 0, 0)), flat / "a.png")
    _raises("use load_unlabeled_folder", load_image_folder, flat, 8)
    (tmp_path / "empty").mkdir()
    _raises("no class folders", load_image_folder, tmp_path / "empty", 8)
    _raises("no images directly in", load_unlabeled_folder, tmp_path / "empty", 8)
    _save(_solid(5, 5, (0, 0, 0)), tmp_path / "bad" / "cat" / "ok.png")
    (tmp_path / "bad" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    _raises("cannot read image 'cat/broken.jpg'", load_image_folder, tmp_path / "bad", 8)
    _raises("channels must be 1 or 3", load_image_folder, root, 8, channels=2)
    _raises("image_size", load_unlabeled_folder, flat, 0)


# --------------------------------------------------------------------- digits


def test_digits():
    s = load_digits()
    assert s.images.shape == (1797, 1, 28, 28) and s.images.dtype == torch.float32
    assert s.classes == [str(d) for d in range(10)]
    assert sorted(set(s.labels.tolist())) == list(range(10))
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    from sklearn.datasets import load_digits as sk

    raw = load_digits(image_size=8)
    assert torch.allclose(raw.images[:, 0], torch.from_numpy(sk().images).float() / 16)


# ----------------------------------------------------------- paths, download


def test_resolve_data_path(tmp_path, monkeypatch):
    (tmp_path / "omniglot").mkdir()
    target = tmp_path / "omniglot" / "x.zip"
    target.write_bytes(b"")
    assert resolve_data_path(str(target), "omniglot/ignored.zip") == target
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path))
    assert resolve_data_path(None, "omniglot/x.zip") == target
    msg = _raises(str(tmp_path / "omniglot" / "y.zip"), resolve_data_path, None, "omniglot/y.zip")
    assert "--data" in msg and "FEWSHOT_DATA" in msg
    msg = _raises(str(tmp_path / "gone"), resolve_data_path, str(tmp_path / "gone"), "omniglot/x.zip")
    assert "--data" in msg
    monkeypatch.delenv("FEWSHOT_DATA")
    msg = _raises("FEWSHOT_DATA is not set", resolve_data_path, None, "omniglot/x.zip")
    assert "--data" in msg and "omniglot/x.zip" in msg


def test_download_list_and_calls(tmp_path, monkeypatch):
    base = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
    listed = omniglot_downloads()
    assert [(u, f) for u, f, _ in listed] == [
        (base + "images_background.zip", "images_background.zip"),
        (base + "images_evaluation.zip", "images_evaluation.zip"),
        (base + "images_background_small1.zip", "images_background_small1.zip"),
        (base + "images_background_small2.zip", "images_background_small2.zip"),
        (base + "one-shot-classification/all_runs.zip", "all_runs.zip"),
    ]
    assert all(len(sha) == 64 and int(sha, 16) >= 0 for _, _, sha in listed)  # every file has a SHA-256
    import torchvision.datasets.utils as tvu

    def fail(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvu, "download_url", fail)
    _raises("could not download " + base + "images_background.zip", sources.download_omniglot, tmp_path)


# The fake release: two zips' contents and their digests; the fake network serves ``served``.
FAKE = {"a.zip": b"the release file a", "b.zip": b"the release file b"}


def _fake_release(monkeypatch, served):
    import hashlib

    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(sources, "_OMNIGLOT_FILES", tuple((n, hashlib.sha256(c).hexdigest()) for n, c in FAKE.items()))
    calls = []

    def fetch(url, root, filename=None, md5=None):  # what download_url does: write root/filename
        calls.append(url.rsplit("/", 1)[-1])
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(served[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(tvu, "download_url", fetch)
    return calls


def test_download_keeps_files_whose_sha256_matches(tmp_path, monkeypatch):
    calls = _fake_release(monkeypatch, FAKE)
    out = sources.download_omniglot(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["a.zip", "b.zip"]  # no .part left behind
    assert all((out / n).read_bytes() == c for n, c in FAKE.items())
    assert sources.download_omniglot(tmp_path) == out and calls == ["a.zip", "b.zip"]  # present and verified: not fetched again


@pytest.mark.parametrize("check", ["on", "disabled"])
def test_a_download_that_fails_its_sha256_is_refused_and_deleted(tmp_path, monkeypatch, capsys, check):
    """A corrupted b.zip: one-line error, nothing kept under its name or as .part. "disabled" is the
    broken variant (the digest not compared), where the same assertions see the bad file kept."""
    _fake_release(monkeypatch, {**FAKE, "b.zip": b"truncated"})
    if check == "disabled":
        real = dict(sources._OMNIGLOT_FILES)
        monkeypatch.setattr(sources, "sha256_file", lambda path: real[path.name.strip(".").removesuffix(".part")])
        sources.download_omniglot(tmp_path)
        assert (tmp_path / "omniglot" / "b.zip").read_bytes() == b"truncated"
        return
    from fewshot.cli import main

    assert main(["data", "download", "omniglot", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256" in err[0] and "b.zip" in err[0] and "deleted" in err[0], err
    assert sorted(p.name for p in (tmp_path / "omniglot").iterdir()) == ["a.zip"]  # the good file stays, the bad one is gone


def test_an_existing_file_with_the_wrong_sha256_is_refused_untouched(tmp_path, monkeypatch):
    calls = _fake_release(monkeypatch, FAKE)
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "a.zip").write_bytes(b"my own edits")
    _raises("is not the release file", sources.download_omniglot, tmp_path)
    assert (tmp_path / "omniglot" / "a.zip").read_bytes() == b"my own edits" and calls == []


@pytest.mark.data
@pytest.mark.parametrize("name", ["images_background_small1.zip", "all_runs.zip"])
def test_the_shared_copies_match_the_download_digests(shared_data, name):
    listed = {f: sha for _, f, sha in omniglot_downloads()}
    assert sources.sha256_file(_real(shared_data, name)) == listed[name]


# ------------------------------------------------------------------ real data


def _real(shared_data: Path, name: str) -> Path:
    path = shared_data / "omniglot" / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.data
def test_real_omniglot_background_small1(shared_data):
    s = load_omniglot(_real(shared_data, "images_background_small1.zip"))
    assert s.images.shape == (2720, 1, 28, 28)
    assert len(s.classes) == 136
    assert sorted(set(s.groups)) == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert s.classes[0] == "Balinese/character01"
    assert torch.bincount(s.labels).tolist() == [20] * 136
    # Ink is bright and sparse: the background is 0 and no stroke vanishes at 28 px
    # (the thinnest drawings still reach 0.75 with area resampling).
    assert 0.03 < float(s.images.mean()) < 0.2
    assert float(s.images[:, :, 0, 0].max()) == 0.0
    assert bool((s.images.amax(dim=(1, 2, 3)) > 0.5).all())


@pytest.mark.data
def test_real_lake_runs(shared_data):
    runs = load_lake_runs(_real(shared_data, "all_runs.zip"))
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for r in runs:
        assert r.train_images.shape == r.test_images.shape == (20, 1, 28, 28)
        assert r.answers.shape == (20,) and sorted(r.answers.tolist()) == list(range(20))
        assert not torch.equal(r.train_images[r.answers], r.test_images)
    assert runs[0].answers[:4].tolist() == [7, 8, 1, 18]  # run01: item01 -> class08, ...
