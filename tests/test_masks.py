"""Per-patch segmentation labels: the shapes generator's masks, and `extract --masks` into the store's labels."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from actstore.errors import ConfigError, CorruptDataError
from actstore.extract import ExtractConfig, build_manifest, run_extract
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.extract.masks import MaskClasses, MaskLabeler, mask_classes, patch_majority
from actstore.store import ActivationStore
from actstore.testing.shapes import SEG_CLASSES, SHAPES, generate_dataset
from actstore_cli import main

MODEL, LAYER = "timm:vit_tiny_patch16_224", "10"
GRID, PATCH = 14, 16  # vit_tiny_patch16_224: 224 / 16
AREA = {"circle": math.pi, "square": 2.0, "hexagon": 3 * math.sqrt(3) / 2, "triangle": 3 * math.sqrt(3) / 4,
        "star": 5 * 0.45 * math.sin(math.pi / 5), "cross": 2.8 - 0.7 ** 2}
"""Area of each shape over its radius squared (the star's inner radius is 0.45 r, the cross's arms 0.7 r wide)."""
MISSING, IGNORED, BROKEN = "star/000010.png", "circle/000000.png", "triangle/zzz.png"
"""Images whose mask is removed, whose mask gets a block of 255, and which is not an image."""


def extract(images: Path, out: Path, **kw) -> object:
    cfg = ExtractConfig(images=str(images), model=MODEL, out=str(out), batch_size=8, images_per_shard=8, **kw)
    return run_extract(cfg, progress=False)


def expected_labels(mask: np.ndarray, resize: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's geometry by hand (PIL NEAREST resize of the shorter side, center crop), then each patch's
    most frequent value, ties to the smaller. Also the patches' pixels, (n_patches, PATCH * PATCH)."""
    h, w = mask.shape
    size = (int(resize * w / h), resize) if w >= h else (resize, int(resize * h / w))  # PIL's (w, h)
    big = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    top, left = round((big.shape[0] - crop) / 2), round((big.shape[1] - crop) / 2)
    cropped = big[top:top + crop, left:left + crop]
    patches = cropped.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    return np.array([np.bincount(p, minlength=256).argmax() for p in patches]), patches


def test_generated_masks_match_the_factors(tmp_path):
    plain = generate_dataset(str(tmp_path / "plain"), 12, seed=4, image_size=64)
    ds = generate_dataset(str(tmp_path / "images"), 12, seed=4, image_size=64, masks=str(tmp_path / "masks"))
    assert SEG_CLASSES == ("background", *SHAPES)
    assert (tmp_path / "masks" / "classes.txt").read_text().splitlines() == list(SEG_CLASSES)
    assert build_manifest(str(tmp_path / "images")).class_names == list(SHAPES)  # the masks are no class
    assert ds.factors.equals(plain.factors)
    for row in ds.factors.to_pylist():
        image = tmp_path / "images" / row["path"]
        assert image.read_bytes() == (tmp_path / "plain" / row["path"]).read_bytes()  # images unchanged
        mask = Image.open(tmp_path / "masks" / row["path"])
        assert mask.mode == "L" and mask.size == (64, 64)
        values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 1 + row["label"]}
        assert SEG_CLASSES[1 + row["label"]] == row["shape"]
        assert 0.95 < (values > 0).sum() / (AREA[row["shape"]] * row["size"] ** 2) < 1.3
        background = np.array([row["background_r"], row["background_g"], row["background_b"]])
        assert np.array_equal(values > 0, (np.asarray(Image.open(image)) != background).any(axis=2))


def test_masks_folder_refusals(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    generate_dataset(str(images), 6, image_size=32, masks=str(masks))
    with pytest.raises(ConfigError, match="overwrite=True"):
        generate_dataset(str(tmp_path / "other"), 6, image_size=32, masks=str(masks))
    generate_dataset(str(images), 3, image_size=32, masks=str(masks), overwrite=True)
    assert len(list(masks.rglob("*.png"))) == 3
    with pytest.raises(ConfigError, match="must not contain each other"):
        generate_dataset(str(images), 3, image_size=32, masks=str(images / "masks"), overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a generated shapes dataset"):
        generate_dataset(str(images), 3, image_size=32, masks=str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert len(list(images.rglob("*.png"))) == 3  # nothing replaced before the refusal


def test_patch_majority_ties_to_the_smallest_value():
    values = np.array([[3, 3, 7, 255],
                       [1, 1, 255, 255]], np.uint8)  # patches 2 x 2: {3, 3, 1, 1} and {7, 255, 255, 255}
    assert patch_majority(values, (1, 2)).tolist() == [1, 255]


@pytest.mark.parametrize("height", [64, 48])
def test_mask_labeler_resizes_nearest(height):
    """Noise masks (where any blending of values shows), square and not: the labeler against expected_labels."""
    labeler = MaskLabeler.create(load_backbone(BackboneConfig(MODEL, (-2,))).preprocessor, (GRID, GRID))
    values = np.random.default_rng(height).choice(np.array([0, 3, 6, 200, 255], np.uint8), size=(height, 64))
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    got = labeler(buf.getvalue(), (64, height), "noise.png")
    assert np.array_equal(got, expected_labels(values, 248, 224)[0])
    with pytest.raises(ConfigError, match=f"the mask is 64 x {height}, its image 64 x 32"):
        labeler(buf.getvalue(), (64, 32), "noise.png")
    with pytest.raises(CorruptDataError, match="broken.png: not a readable PNG mask"):
        labeler(buf.getvalue()[:100], (64, height), "broken.png")
    buf = io.BytesIO()
    Image.fromarray(np.stack([values] * 3, axis=2)).save(buf, "PNG")
    with pytest.raises(ConfigError, match="mode RGB"):
        labeler(buf.getvalue(), (64, height), "rgb.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 shapes and their masks, edited: one mask removed, one with a block of 255, one image that is not one."""
    root = tmp_path_factory.mktemp("masks")
    generate_dataset(str(root / "images"), 12, seed=4, image_size=64, masks=str(root / "masks"))
    (root / "masks" / MISSING).unlink()
    mask = np.array(Image.open(root / "masks" / IGNORED))
    mask[:, :10] = 255  # columns 0-9 of 64 end inside the second patch column after resize 248 and crop 224
    Image.fromarray(mask).save(root / "masks" / IGNORED)
    (root / "images" / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    shutil.copy(root / "masks" / "triangle" / "000005.png", root / "masks" / BROKEN)  # a mask it must not use
    return root


@pytest.fixture(scope="module")
def labelled(ray_local, data) -> Path:
    """A store with labels, in two runs: unit 0 by run_extract, then the rest by the command line (resume)."""
    out = data / "store"
    first = extract(data / "images", out, masks=str(data / "masks"), max_units=1)
    assert not first.complete and first.n_unmasked == 0  # MISSING lies in unit 1
    return out


def test_cli_resumes_and_counts_images_without_a_mask(labelled, data, capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    help_text = capsys.readouterr().out
    assert "--masks MASKS" in help_text and "--mask-suffix MASK_SUFFIX" in help_text
    assert main(["extract", "--images", str(data / "images"), "--model", MODEL, "--out", str(labelled),
                 "--batch-size", "8", "--images-per-shard", "8", "--masks", str(data / "masks"), "-q"]) == 0
    line = capsys.readouterr().out
    assert "complete; 1 units written (5 images, 1 rejected, 1 without a mask), 1 already done" in line


def test_labels_equal_an_independent_computation(labelled, data):
    # the CLI test finishes the store; run it here too when this test runs alone
    result = extract(data / "images", labelled, masks=str(data / "masks"))
    assert result.complete
    store = ActivationStore(str(labelled))
    spec = store.spec
    assert spec.has_labels and spec.dataset["mask_classes"] == list(SEG_CLASSES)
    prep = spec.backbone["preprocessing"]
    assert prep["resize"] == 248 and prep["crop"] == [224, 224]
    table = store.images().to_pandas()
    labels = store.labels()
    assert labels.shape == (13, GRID * GRID) and labels.dtype == np.int32
    assert np.array_equal(store.labels(3, 5), labels[3:5])
    mixed = 0
    for i, uri in enumerate(table.uri):
        rel = Path(uri).relative_to(data / "images").as_posix()
        if rel in (MISSING, BROKEN):
            assert (labels[i] == 255).all(), rel
            assert table.status[i] == ("rejected" if rel == BROKEN else "ok")
            continue
        want, patches = expected_labels(np.asarray(Image.open(data / "masks" / rel)), 248, 224)
        assert np.array_equal(labels[i], want), rel
        assert set(np.unique(labels[i])) <= {0, 1 + SHAPES.index(rel.split("/")[0]), 255}
        if rel == IGNORED:
            share = (patches == 255).mean(axis=1)
            assert share.max() == 1.0 and ((share > 0.5) & (share < 1)).any()  # whole and partial patches
            assert (labels[i][share > 0.5] == 255).all() and (labels[i][share < 0.5] != 255).all()
        mixed += len(np.unique(labels[i])) > 1
    assert mixed >= 10  # shapes do show up in the labels
    # per-patch labels tell the shape's patches from the background's: a sanity check of the alignment
    shape_rows = (labels[:12] > 0) & (labels[:12] < 255)
    assert 0 < shape_rows.mean() < 0.5


def test_store_without_masks_has_no_labels(labelled, data, tmp_path):
    extract(data / "images", labelled, masks=str(data / "masks"))  # complete (a no-op after the tests above)
    plain = tmp_path / "plain"
    result = extract(data / "images", plain)
    assert result.complete and result.n_unmasked == 0 and result.n_rejected == 1
    store = ActivationStore(str(plain))
    assert store.spec.has_labels is False and store.labels() is None
    assert not (plain / "labels").exists() and "mask_classes" not in store.spec.dataset
    with_labels = ActivationStore(str(labelled))
    assert torch.equal(store.read(LAYER).view(torch.int16), with_labels.read(LAYER).view(torch.int16))


def test_bad_masks_folder_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        extract(data / "images", tmp_path / "store", masks=str(tmp_path / "nowhere"))


# the datasets' own layouts: ADE20K, Pascal VOC, Cityscapes ---------------------------------------------------------

ADE_NAMES = ("wall", "building;edifice", "bed", "pool;table;billiard;table")
"""Names as objectInfo150.csv spells them (';' between synonyms and between words); Idx 1..4."""
CITY_PAIR = "_leftImg8bit.png:_gtFine_labelTrainIds.png"
ADE_TIES = (slice(92, 108), slice(12, 236))
"""Patch row 5 of the center crop (offset 12) of a 248 x 248 mask."""


def save_image(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).save(path)


def save_mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P" if palette else "L", values.shape[::-1], values.tobytes())
    if palette:  # VOC's SegmentationClass: mode P, the palette indices are the classes
        im.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tobytes())
    im.save(path)
    assert Image.open(path).mode == im.mode


def noise(seed: int, values: list[int], shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Blocks of 4 x 4 pixels of random values, then a band of values[0] over the top quarter: whole patches of
    one value and mixed ones."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(np.array(values, np.uint8), size=(shape[0] // 4, shape[1] // 4))
    out = np.kron(blocks, np.ones((4, 4), np.uint8))
    out[:shape[0] // 4] = values[0]
    return out


def ade20k(root: Path) -> tuple[Path, Path, dict, dict[str, np.ndarray]]:
    """images/training/*.jpg, annotations/training/*.png with ADE20K's values (0 = other, k = Idx k) and
    objectInfo150.csv at the root. Also each image's expected labels before the geometry, remapped by hand."""
    lines = ["Idx,Ratio,Train,Val,Stuff,Name"] + [f"{k},0.1,10,1,0,{n}" for k, n in enumerate(ADE_NAMES, 1)]
    root.mkdir()
    (root / "objectInfo150.csv").write_text("\n".join(lines) + "\n")
    want = {}
    for i in range(3):
        stem = f"ADE_train_{i + 1:08d}"
        save_image(root / "images" / "training" / f"{stem}.jpg", (248, 248), i)  # resize 248: the crop alone
        values = noise(i, [0, 1, 2, 3, 4], (248, 248))
        values[ADE_TIES] = np.tile(np.repeat(np.array([0, 3], np.uint8), 8), 14)  # each patch half 0, half 3
        save_mask(root / "annotations" / "training" / f"{stem}.png", values)
        want[f"{stem}.jpg"] = np.where(values == 0, 255, values.astype(np.int32) - 1).astype(np.uint8)
    return root / "images" / "training", root / "annotations" / "training", {}, want


def voc(root: Path) -> tuple[Path, Path, dict, dict[str, np.ndarray]]:
    """JPEGImages/*.jpg, SegmentationClass/*.png of mode P (0 = background, a class; 255 = void) and a
    classes.txt naming the values: they are the labels as they are."""
    want = {}
    for i in range(3):
        save_image(root / "JPEGImages" / f"2007_00000{i}.jpg", (64, 48), 10 + i)
        values = noise(10 + i, [255, 0, 15, 20])
        save_mask(root / "SegmentationClass" / f"2007_00000{i}.png", values, palette=True)
        want[f"2007_00000{i}.jpg"] = values
    (root / "SegmentationClass" / "classes.txt").write_text("\n".join(f"class{k}" for k in range(21)) + "\n")
    return root / "JPEGImages", root / "SegmentationClass", {}, want


def cityscapes(root: Path) -> tuple[Path, Path, dict, dict[str, np.ndarray]]:
    """leftImg8bit/train/<city>/<city>_*_leftImg8bit.png, gtFine/train/<city>/<city>_*_gtFine_labelTrainIds.png
    (trainIds, 255 = ignore) beside gtFine's other files of the same image, which must not be read."""
    want = {}
    for i, city in enumerate(["aachen", "aachen", "bochum"]):
        stem = f"{city}_00000{i}_000019"
        save_image(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", (64, 48), 20 + i)
        values = noise(20 + i, [255, 0, 7, 18])
        save_mask(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelTrainIds.png", values)
        save_mask(root / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", np.full_like(values, 33))
        want[f"{city}/{stem}_leftImg8bit.png"] = values
    return root / "leftImg8bit" / "train", root / "gtFine" / "train", {"mask_suffix": CITY_PAIR}, want


@pytest.mark.parametrize("layout", [ade20k, voc, cityscapes])
def test_dataset_layouts_label_patches_as_computed_by_hand(ray_local, tmp_path, layout):
    images, masks, kw, want = layout(tmp_path / "data")
    result = extract(images, tmp_path / "store", masks=str(masks), **kw)
    assert result.complete and result.n_unmasked == 0 and result.n_rejected == 0
    store = ActivationStore(str(tmp_path / "store"))
    dataset, labels = store.spec.dataset, store.labels()
    uris = list(store.images().to_pandas().uri)
    assert [Path(u).relative_to(images).as_posix() for u in uris] == sorted(want)
    for i, uri in enumerate(uris):
        expected = expected_labels(want[Path(uri).relative_to(images).as_posix()], 248, 224)[0]
        assert np.array_equal(labels[i], expected), uri
    seen = set(np.unique(labels).tolist())
    if layout is ade20k:
        assert dataset["mask_classes"] == list(ADE_NAMES)
        assert dataset["mask_remap"].startswith(f"ade20k ({tmp_path / 'data' / 'objectInfo150.csv'}): mask value 0 "
                                                "-> 255 (ignore), k -> k - 1")
        assert seen == {0, 1, 2, 3, 255}  # 4 classes and "other"; no raw value 4 is left
        # remapped before the majority: "other" (255 now) loses its ties with class 2 (raw 3)
        assert (labels[:, 5 * GRID:6 * GRID] == 2).all()
    elif layout is voc:
        assert dataset["mask_classes"] == [f"class{k}" for k in range(21)] and "mask_remap" not in dataset
        assert seen == {0, 15, 20, 255}  # background stays class 0, void stays 255
    else:
        assert dataset["mask_classes"] == [] and "mask_remap" not in dataset
        assert seen == {0, 7, 18, 255} and 33 not in seen  # the labelTrainIds files, not labelIds


def test_ade20k_table_variants(tmp_path):
    """The release's tab-separated objectInfo150.txt one folder up (spaces around cells, as in the release), the
    table's place among the folders, classes.txt first, and broken tables."""
    masks = tmp_path / "ADE" / "annotations" / "training"
    masks.mkdir(parents=True)
    (masks.parent / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n"
                                                    "3 \t0.0231\t1906\t199\tbed \n"
                                                    "2\t0.1072\t6046\t612\tbuilding, edifice\n")
    classes = mask_classes(str(masks), {})
    assert classes.names == ("wall", "building, edifice", "bed")
    lookup = np.frombuffer(classes.remap, np.uint8)
    raw = np.arange(256)
    assert np.array_equal(lookup[raw], np.where((raw == 0) | (raw == 255), 255, raw - 1))
    assert classes.attrs()["mask_remap"].startswith(f"ade20k ({masks.parent / 'objectInfo150.txt'})")
    assert mask_classes(str(masks / "deeper"), {}).names == ("wall", "building, edifice", "bed")  # two up
    assert mask_classes(str(masks / "deeper" / "still"), {}) == MaskClasses()  # three up: not this dataset's
    (masks / "classes.txt").write_text("a\nb\n")
    assert mask_classes(str(masks), {}) == MaskClasses(("a", "b"))  # the folder's own names: values as they are
    (masks / "classes.txt").unlink()
    (masks / "objectInfo150.csv").write_text("Idx,Name\n1,wall\n3,bed\n")  # the folder's own table comes first
    with pytest.raises(ConfigError, match=r"objectInfo150.csv: the Idx column must hold 1..K"):
        mask_classes(str(masks), {})
    (masks / "objectInfo150.csv").write_text("Index,Name\n1,wall\n")
    with pytest.raises(ConfigError, match=r"objectInfo150.csv: not an ADE20K class table"):
        mask_classes(str(masks), {})


def test_mask_suffix_refusals(tmp_path):
    images, masks, _, _ = cityscapes(tmp_path / "city")
    for bad in ("_leftImg8bit.png", "_leftImg8bit.png:"):
        with pytest.raises(ConfigError, match=f"mask_suffix '{bad}': expected IMAGE_END:MASK_END"):
            ExtractConfig(images=str(images), model=MODEL, out=str(tmp_path / "store"), masks=str(masks),
                          mask_suffix=bad)
    with pytest.raises(ConfigError, match="give masks too"):
        ExtractConfig(images=str(images), model=MODEL, out=str(tmp_path / "store"), mask_suffix=CITY_PAIR)
    first = images / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    with pytest.raises(ConfigError, match=f"--mask-suffix: the image {first} does not end with '_leftImg8bit.jpg'"):
        extract(images, tmp_path / "store", masks=str(masks), mask_suffix="_leftImg8bit.jpg:_gtFine_labelTrainIds.png")
    assert not (tmp_path / "store").exists()  # refused before anything was written
