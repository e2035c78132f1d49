"""Shared fixtures: tiny image folders of coloured shapes built on the fly."""
from __future__ import annotations

import contextlib
import functools
import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import pipeline  # noqa: E402,F401  (sets the library environment, as for every process of the pipeline)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# One class name with a space, one with non-ASCII letters.
CLASSES = ("circle", "red square", "étoile")
COLOURS = {"circle": (40, 90, 220), "red square": (220, 40, 40), "étoile": (240, 200, 30)}
REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"


def shape_image(label, seed, size=40):
    """A small RGB image of the class's shape and colour, with a little per-image variation."""
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(180, 255, 3))
    image = Image.new("RGB", (size + int(rng.integers(0, 8)), size), background)
    draw = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(2, 8)), int(rng.integers(2, 8))
    box = (x0, y0, x0 + size // 2 + 8, y0 + size // 2 + 8)
    colour = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in COLOURS[label])
    if label == "circle":
        draw.ellipse(box, fill=colour)
    elif label == "red square":
        draw.rectangle(box, fill=colour)
    else:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=colour)
    return image


def write_images(folder, label, count, start=0):
    """Write `count` JPEGs of one class into `folder`; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:03d}.jpg"
        # zlib.crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so did the images
        # and the splits ingest gives them (three images of a class all left out of train, now and then)
        shape_image(label, seed=zlib.crc32(f"{label}:{i}".encode())).save(path, quality=92)
        paths.append(path)
    return paths


def make_split_dataset(root, counts=None, splits=("train", "val", "test"), classes=CLASSES):
    """A snacks-style dataset: root/<split>/<class>/*.jpg."""
    counts = counts or {"train": 8, "val": 3, "test": 3}
    for s, split in enumerate(splits):
        for label in classes:
            write_images(root / split / label, label, counts[split], start=100 * s)
    return root


def make_class_dataset(root, count=20, classes=CLASSES):
    """A bare dataset: root/<class>/*.jpg, no splits."""
    for label in classes:
        write_images(root / label, label, count)
    return root


@pytest.fixture(scope="session", autouse=True)
def temporary_files_inside_the_test_folder(tmp_path_factory):
    """The converters' temporary files (coremltools leaves `tmp*.mlpackage` folders) go under pytest's own temporary
    folder, as a run's go under its artifacts folder, never into the system's."""
    from pipeline import fileio

    with fileio.temporary_files_in(tmp_path_factory.mktemp("tmp")):
        yield


@pytest.fixture
def split_dataset(tmp_path):
    """A tiny train/val/test dataset of three shape classes."""
    return make_split_dataset(tmp_path / "shapes")


@pytest.fixture
def class_dataset(tmp_path):
    """A tiny dataset of three class folders with no splits."""
    return make_class_dataset(tmp_path / "bare")


def invoke(*args):
    """Run the CLI in-process; return Click's result (stdout and stderr captured)."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ran(result):
    """The stages a CLI run actually ran, from its log."""
    import re

    return re.findall(r"I (\S+)\s+running \(", result.stderr)


def base_args(world, artifacts=None, config=SMOKE_CONFIG):
    """Global CLI options for the shared smoke world, optionally with another artifacts folder or config."""
    return ["--config", str(config), "--data", str(world["data"]), "--artifacts", str(artifacts or world["artifacts"])]


@pytest.fixture(scope="session")
def world(tmp_path_factory, worker_id):
    """One full smoke run of every stage on a tiny dataset, shared by the end-to-end tests (copy before changing).

    Built once per test session: under pytest-xdist the first worker to need it builds it in the folder the
    workers share (the others wait for it), and each worker works on its own copy of the artifacts. "first" is
    that run's result (exit_code, stdout, stderr).
    """
    import fcntl
    import json
    import shutil
    from types import SimpleNamespace

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent
    built = shared / "e2e-world"
    with open(shared / "e2e-world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (built / "first.json").is_file():
            shutil.rmtree(built, ignore_errors=True)
            data = make_split_dataset(built / "shapes")
            first = invoke("--config", str(SMOKE_CONFIG), "--data", str(data), "--artifacts",
                           str(built / "artifacts"), "all")
            (built / "first.json").write_text(json.dumps(
                {"exit_code": first.exit_code, "stdout": first.stdout, "stderr": first.stderr}), encoding="utf-8")
    root = tmp_path_factory.mktemp("e2e")
    shutil.copytree(built / "artifacts", root / "artifacts")
    first = SimpleNamespace(**json.loads((built / "first.json").read_text(encoding="utf-8")))
    return {"root": root, "data": built / "shapes", "artifacts": root / "artifacts", "first": first}


def exif_jpeg(path, image, orientation):
    """Save `image` as a JPEG whose EXIF orientation tag (0x0112) is `orientation`; return the path."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    return path


def zip_folder(folder, archive, prefix=None):
    """Pack every file under `folder` into a .zip, members under `prefix/` (default: the folder's name)."""
    import zipfile

    prefix = folder.name if prefix is None else prefix
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, str(Path(prefix) / path.relative_to(folder)))
    return archive


def processes_running(text):
    """PIDs of live processes whose command line contains `text` (from Linux's /proc, so without psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return found


def snapshot(folder):
    """Every file and folder under `folder` with its size and mtime, to show that nothing changed it."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def calibrated_weights_dir(tmp_path_factory):
    """A stand-in for Keras's ImageNet file of MobileNet alpha 0.25 whose network does not collapse.

    A randomly initialised MobileNet maps every image to nearly the same features (its BatchNorm statistics
    do not match its activations), so nothing can be learnt from it. Setting each BatchNorm's statistics to
    those of its input on real images fixes that; the file is saved under Keras's own name, so the pipeline
    loads it through its real weight-loading code.
    """
    import tf_keras as keras

    folder = tmp_path_factory.mktemp("weights")
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, include_top=False, weights=None)
    images = np.stack([np.asarray(shape_image(label, seed, 40).resize((32, 32)), dtype=np.float32)
                       for label in CLASSES for seed in range(8)]) / 127.5 - 1
    calibrate_batchnorm(base, images)
    base.save_weights(str(folder / "mobilenet_2_5_224_tf_no_top.h5"))
    return folder


def damp_residual_branches(base, factor=0.2):
    """Scale the last BatchNorm of each ResNet residual branch (`*_3_bn`) by `factor`.

    A random 50-layer ResNet is chaotic: float32 rounding differences between runtimes (1e-7) grow to 1e-4 in
    its probabilities, where a trained one stays near 1e-5. Damped branches (as in zero-gamma initialisation)
    keep it stable while every layer still contributes, so a conversion error still shows. No-op elsewhere.
    """
    for layer in base.layers:
        if layer.name.endswith("_3_bn"):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma * factor, beta * factor, mean, variance])


def calibrate_batchnorm(base, images):
    """Set every BatchNorm's moving statistics to those of its input on `images` (preprocessed), in order, so
    that a randomly initialised network passes on varied activations instead of collapsing."""
    import tf_keras as keras

    layers = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        inputs = keras.Model(base.input, layer.input)(images, training=False).numpy()
        gamma, beta = layer.get_weights()[:2]
        layer.set_weights([gamma, beta, inputs.mean(axis=(0, 1, 2)), inputs.var(axis=(0, 1, 2)) + 1e-3])


def varied_images(n, size, seed):
    """Images that differ in colour and brightness, not only in noise: each a random tint plus texture."""
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0, 255, (n, 1, 1, 3))
    return np.clip(tint + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.float32)


def damp_inverted_residual_branches(base, factor=0.5):
    """Scale the projection BatchNorm of each inverted-residual branch that is added back (`*project*` into an Add).

    The MobileNetV2 / EfficientNet-Lite counterpart of `damp_residual_branches`: a random MobileNetV2 is chaotic
    under fp16 rounding (its relative error doubles every few blocks, to 7% in the pooled features; its
    probabilities move by up to 0.12, 0.04 once damped by half). Damped, every layer still contributes.
    """
    import tf_keras as keras

    for layer in base.layers:
        if isinstance(layer, keras.layers.Add):
            for inbound in layer._inbound_nodes[0].inbound_layers:
                if isinstance(inbound, keras.layers.BatchNormalization) and "project" in inbound.name:
                    gamma, beta, mean, variance = inbound.get_weights()
                    inbound.set_weights([gamma * factor, beta * factor, mean, variance])


EXPORT_LABELS = ["circle", "red square", "étoile"]  # blue, red, yellow: sorted as classes.txt sorts them


@functools.lru_cache(maxsize=None)
def backbone_classifier(name):
    """(model, meta) of a 32 px classifier on backbone `name`, built once per test session for every module that
    exports one: seeded random weights, BatchNorm calibrated, residual branches damped, and a Dense head scaled
    and centred on the features of varied images, so that its top-1 class varies and is not a tie. Tests must
    not change the model."""
    import tf_keras as keras

    from pipeline.backbones import BACKBONES
    from pipeline.config import ModelConfig
    from pipeline.export.meta import ExportMeta
    from pipeline.train import models

    spec = BACKBONES[name]
    keras.utils.set_random_seed(0)  # the same random network in every run
    model = models.build_classifier(ModelConfig(backbone=name, image_size=32, weights=None), 3)

    def preprocess(pixels):  # the registry's definition, written out: one scale, a bias per RGB channel
        return pixels * spec.input_scale + np.array(spec.input_bias, dtype=np.float32)

    calibrate_batchnorm(models.backbone_of(model), preprocess(varied_images(32, 32, 0)))
    damp_residual_branches(models.backbone_of(model))
    damp_inverted_residual_branches(models.backbone_of(model))
    features = models.feature_extractor(model).predict(preprocess(varied_images(64, 32, 1)), verbose=0)
    kernel = np.random.default_rng(0).normal(size=(features.shape[1], 3))
    kernel *= 3 / (features @ kernel).std(axis=0)
    model.get_layer("logits").set_weights([kernel.astype(np.float32),
                                           -(features.mean(axis=0) @ kernel).astype(np.float32)])
    meta = ExportMeta(labels=EXPORT_LABELS, image_size=32, scale=spec.input_scale, bias=spec.input_bias,
                      author="tests", license="MIT", description="", version="0.0")
    return model, meta


@contextlib.contextmanager
def log_records(name, level):
    """The records logger `name` gets at `level` and above inside the block (the CLI's logging setup keeps them from
    pytest's caplog)."""
    import logging

    records = []
    handler = logging.Handler(level)
    handler.emit = records.append
    logger = logging.getLogger(name)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, saved or level))
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)


def backbones_to_export(also_lite2=False):
    """The registry's backbones that an every-backbone export test converts: all but EfficientNet-Lite1 and Lite2,
    whose layers are Lite0's kinds in other widths and depths (tests/test_efficientnet_lite.py checks their
    architecture and weights), unless `also_lite2`: the 21-block layout of both, with widths that are not Lite0's."""
    from pipeline.backbones import BACKBONES

    left_out = {"efficientnet_lite1"} | (set() if also_lite2 else {"efficientnet_lite2"})
    return [name for name in sorted(BACKBONES) if name not in left_out]


def smoke_cfg(world, **sections):
    """The smoke config on the world's dataset, with whole sections replaced by `sections` if given."""
    from pipeline import config

    cfg = config.load(SMOKE_CONFIG, data=world["data"])
    if not sections:
        return cfg
    raw = {name: cfg.section(name) for name in ("data", "ingest", "augment", "model", "train_head", "finetune",
                                                 "evaluate", "export", "distribute")}
    return config.from_dict({**raw, **sections, "data": {"path": str(world["data"])}})
