"""The pipeline's configuration: one documented dataclass per section, loaded from YAML and validated.

Every key not given in a config file takes the default written here. Validation rejects unknown keys,
wrong types and impossible values with a message naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.backbones import BACKBONES
from pipeline.environment import WEIGHTS_DIR_ENV
from pipeline.errors import ConfigError
from pipeline.export.formats import FORMATS

DEFAULT_CONFIG = Path("configs/multisnacks.yaml")


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled images come from.

    path: a folder (train/val[/test] splits, or one folder per class) or a .zip/.tar.gz archive of one;
        empty means: download the snacks dataset into the Keras cache.
    """

    path: str | None = None


@dataclass(frozen=True)
class IngestConfig:
    """How ingest checks and splits the images.

    val_ratio, test_ratio: fractions of each class put in val / test when ingest makes the splits itself.
    seed: mixed into the content hash that assigns each image to a split.
    on_bad_image: `skip` lists an unreadable image and goes on; `fail` stops at the first one.
    max_image_pixels: larger images are rejected as absurd (decompression bombs, scans).
    max_file_mb: larger files are rejected without being decoded.
    imbalance_ratio: a class with fewer than this fraction of the largest class's images gets a warning.
    max_archive_gb: a dataset archive may unpack to at most this many GB (the snacks zip: 0.11).
    max_compression_ratio: a dataset archive may unpack to at most this many times its own size (photos barely
        compress: the snacks zip unpacks to 1.02 times its size; an archive bomb to 1000 times and more). Both
        limits are checked from the archive's headers before unpacking and enforced while unpacking.
    follow_symlinks: also read symbolic links that lead outside the dataset folder; by default they are listed
        and skipped. Links that stay inside the dataset folder are followed (those to a folder within a class
        folder are listed, not followed).
    """

    val_ratio: float = 0.15
    test_ratio: float = 0.15
    seed: int = 0
    on_bad_image: typing.Literal["skip", "fail"] = "skip"
    max_image_pixels: int = 50_000_000
    max_file_mb: float = 50.0
    imbalance_ratio: float = 0.5
    max_archive_gb: float = 10.0
    max_compression_ratio: float = 100.0
    follow_symlinks: bool = False

    def validate(self):
        _check("ingest.val_ratio", self.val_ratio, 0 < self.val_ratio < 1, "a number in (0, 1)")
        _check("ingest.test_ratio", self.test_ratio, 0 < self.test_ratio < 1, "a number in (0, 1)")
        _check("ingest.test_ratio", self.test_ratio, self.val_ratio + self.test_ratio < 0.9,
               "val_ratio + test_ratio below 0.9, so training keeps images")
        _check("ingest.max_image_pixels", self.max_image_pixels, self.max_image_pixels > 0, "a positive integer")
        _check("ingest.max_file_mb", self.max_file_mb, self.max_file_mb > 0, "a positive number")
        _check("ingest.imbalance_ratio", self.imbalance_ratio, 0 <= self.imbalance_ratio <= 1, "a number in [0, 1]")
        _check("ingest.max_archive_gb", self.max_archive_gb, self.max_archive_gb > 0, "a positive number")
        _check("ingest.max_compression_ratio", self.max_compression_ratio, self.max_compression_ratio >= 1,
               "a number >= 1")


@dataclass(frozen=True)
class AugmentConfig:
    """Keras ImageDataGenerator settings for the training images (the book's values by default).

    preview_images: how many augmented samples the preview grid shows.
    """

    rotation_range: float = 40
    width_shift_range: float = 0.2
    height_shift_range: float = 0.2
    shear_range: float = 0.2
    zoom_range: float = 0.2
    channel_shift_range: float = 0.2
    horizontal_flip: bool = True
    fill_mode: typing.Literal["nearest", "constant", "reflect", "wrap"] = "nearest"
    preview_images: int = 16

    def validate(self):
        for name in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range",
                     "zoom_range", "channel_shift_range"):
            value = getattr(self, name)
            _check(f"augment.{name}", value, value >= 0, "a number >= 0")
        _check("augment.rotation_range", self.rotation_range, self.rotation_range <= 180, "degrees in [0, 180]")
        _check("augment.zoom_range", self.zoom_range, self.zoom_range < 1, "a number in [0, 1)")
        _check("augment.preview_images", self.preview_images, 1 <= self.preview_images <= 64,
               "an integer in [1, 64]")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a frozen ImageNet backbone under GlobalAveragePooling -> Dropout -> Dense(L2) -> softmax.

    backbone: a name from pipeline.backbones.BACKBONES: ImageNet networks (efficientnet_lite0, efficientnet_lite1,
        efficientnet_lite2, mobilenet, mobilenet_v2, resnet50), or small networks trained from scratch (mynet,
        smallcnn; model.weights null, train_head.features live, and finetune.epochs 0).
    alpha: the width multiplier, one the backbone offers (MobileNet v1: 0.25, 0.5, 0.75, 1.0); null = the
        backbone's default (MobileNet v1: 0.75).
    image_size: the square input size in pixels, also the exported models' input size.
    weights: `imagenet`, or null for random initialisation (the small networks; tests).
    weights_dir: a folder of Keras weight files, looked in before Keras's cache and download; when the config
        does not set it, $MULTISNACKS_WEIGHTS_DIR if set (the --weights-dir option sets it too). Not part of the
        cache key: it says where a file is, not what to compute.
    dropout, l2: the head's dropout rate and the Dense layer's L2 factor.
    """

    backbone: str = "efficientnet_lite2"
    alpha: float | None = None
    image_size: int = 260
    weights: typing.Literal["imagenet"] | None = "imagenet"
    weights_dir: str | None = field(default_factory=lambda: os.environ.get(WEIGHTS_DIR_ENV) or None,
                                    metadata={"cache_key": False})
    dropout: float = 0.5
    l2: float = 0.001

    def validate(self):
        _check("model.backbone", self.backbone, self.backbone in BACKBONES, f"one of {sorted(BACKBONES)}")
        spec = BACKBONES[self.backbone]
        _check("model.alpha", self.alpha, self.alpha is None or self.alpha in spec.alphas,
               f"null or one of {sorted(spec.alphas)} for backbone {self.backbone}")
        _check("model.image_size", self.image_size, spec.min_image_size <= self.image_size <= 1024,
               f"an integer in [{spec.min_image_size}, 1024] for backbone {self.backbone}")
        _check("model.weights", self.weights, self.weights is None or not spec.from_scratch,
               f"null for backbone {self.backbone}, which has no pretrained weights (it trains from scratch)")
        _check("model.dropout", self.dropout, 0 <= self.dropout < 1, "a number in [0, 1)")
        _check("model.l2", self.l2, self.l2 >= 0, "a number >= 0")


@dataclass(frozen=True)
class TrainingConfig:
    """What train_head and finetune share: how long, how fast, which loss, and which cached views.

    epochs, batch_size, learning_rate: as in Keras's fit and the optimizer.
    optimizer: `adam`, `sgd` or `rmsprop`; momentum: SGD's and RMSprop's momentum (Adam ignores it).
    class_weight: `none`, or `balanced`: each class's loss weighted by n_images / (n_classes * its count), so
        a small class counts as much as a large one.
    oversample: repeat the smaller classes' training images (or cached views) in every epoch up to the
        largest class's count; for live and cached training alike.
    schedule: `constant`; `plateau` (ReduceLROnPlateau on validation loss: lr_factor, lr_patience, min_lr);
        `cosine` (linear warm-up over warmup_epochs, then cosine decay to min_lr at the last epoch).
    label_smoothing: categorical cross-entropy's label smoothing (0 = none).
    ema_momentum: keep an exponential moving average of the weights with this momentum (e.g. 0.99) and
        copy it into the model at the end of every epoch, so validation, the kept best epoch and the saved
        model are the averaged weights; null = none.
    patience: EarlyStopping patience on validation accuracy (the best epoch is restored).
    max_minutes: the time budget of training: no epoch starts that would end after it, judged by the longest
        epoch so far (the best epoch is kept); null = no limit.
    flip_view, augmented_views: the fixed views of each training image that cached training computes once:
        the original, its mirror image if flip_view, and that many augmented copies.
    views_per_epoch: each epoch of cached training draws this many of those views per image (null = all), so
        a bank of many augmented views adds diversity without longer epochs.
    seed: seeds shuffling, augmentation and initialisation.
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: typing.Literal["adam", "sgd", "rmsprop"] = "adam"
    momentum: float = 0.9
    class_weight: typing.Literal["none", "balanced"] = "none"
    oversample: bool = False
    schedule: typing.Literal["constant", "plateau", "cosine"] = "constant"
    warmup_epochs: int = 0
    lr_factor: float = 1 / 3
    lr_patience: int = 2
    min_lr: float = 1e-7
    label_smoothing: float = 0.0
    ema_momentum: float | None = None
    patience: int = 3
    max_minutes: float | None = None
    flip_view: bool = True
    augmented_views: int = 0
    views_per_epoch: int | None = None
    seed: int = 0

    def validate(self):
        section = self.SECTION
        low = 0 if section == "finetune" else 1
        _check(f"{section}.epochs", self.epochs, low <= self.epochs <= 1000, f"an integer in [{low}, 1000]")
        _check(f"{section}.batch_size", self.batch_size, 1 <= self.batch_size <= 4096, "an integer in [1, 4096]")
        _check(f"{section}.learning_rate", self.learning_rate, 0 < self.learning_rate <= 1, "a number in (0, 1]")
        _check(f"{section}.momentum", self.momentum, 0 <= self.momentum < 1, "a number in [0, 1)")
        _check(f"{section}.warmup_epochs", self.warmup_epochs, 0 <= self.warmup_epochs < max(self.epochs, 1),
               f"an integer in [0, {section}.epochs)")
        _check(f"{section}.lr_factor", self.lr_factor, 0 < self.lr_factor < 1, "a number in (0, 1)")
        _check(f"{section}.lr_patience", self.lr_patience, self.lr_patience >= 0, "an integer >= 0")
        _check(f"{section}.min_lr", self.min_lr, 0 <= self.min_lr < self.learning_rate,
               f"a number >= 0 and below {section}.learning_rate")
        _check(f"{section}.label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "a number in [0, 1)")
        _check(f"{section}.ema_momentum", self.ema_momentum,
               self.ema_momentum is None or 0 < self.ema_momentum < 1, "null or a number in (0, 1)")
        _check(f"{section}.patience", self.patience, self.patience >= 0, "an integer >= 0")
        _check(f"{section}.max_minutes", self.max_minutes, self.max_minutes is None or self.max_minutes > 0,
               "a positive number or null")
        _check(f"{section}.augmented_views", self.augmented_views, 0 <= self.augmented_views <= 50,
               "an integer in [0, 50]")
        n_views = 1 + self.flip_view + self.augmented_views
        _check(f"{section}.views_per_epoch", self.views_per_epoch,
               self.views_per_epoch is None or 1 <= self.views_per_epoch <= n_views,
               f"null or an integer in [1, {n_views}] (the cached views: original, mirror, augmented_views)")


@dataclass(frozen=True)
class TrainHeadConfig(TrainingConfig):
    """Training the new head on the frozen backbone. The defaults are the default recipe's: up to 40 epochs of
    Adam at 1e-3 on cached features of each image and its mirror (configs/book.yaml has the book's: 10 epochs,
    live augmentation).

    features: `live` augments every epoch through the whole network (the book); `cached` computes the
        frozen backbone's pooled features once for fixed views of each training image and trains the head
        on those (same model, much faster).
    """

    SECTION: typing.ClassVar[str] = "train_head"
    epochs: int = 40
    patience: int = 8
    features: typing.Literal["live", "cached"] = "cached"


@dataclass(frozen=True)
class FinetuneConfig(TrainingConfig):
    """Fine-tuning the whole network, or its top blocks, at a lower learning rate. The defaults are the default
    recipe's: EfficientNet-Lite2's blocks 6a-7a and top trained on cached block-6a inputs of the originals and
    mirrors, at most 22 minutes.

    epochs: 0 skips fine-tuning (the head model is passed on unchanged).
    unfreeze_from: `all` unfreezes the whole backbone; a cut point of the backbone (its registry entry in
        pipeline.backbones: EfficientNet-Lite `block1a`... and `top`, MobileNet v1 `block1`-`block13`, MobileNet v2
        `block_0`-`block_16` and `top`) unfreezes the layers from there on. Not checked when epochs is 0.
    freeze_batchnorm: keep BatchNormalization layers' scale and offset fixed too (their statistics never
        change: the backbone always runs in inference mode).
    inputs: `live` feeds freshly augmented images every epoch (the book); `cached` computes the activations
        at `unfreeze_from` once for the fixed views of each training image and trains the layers above on
        those. Same model, several times faster; needs a cut point and freeze_batchnorm. The activations are
        written to a file in the stage's folder and read back in batches.
    """

    SECTION: typing.ClassVar[str] = "finetune"
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-4
    schedule: typing.Literal["constant", "plateau", "cosine"] = "plateau"
    lr_patience: int = 1
    patience: int = 3
    max_minutes: float | None = 22
    unfreeze_from: str = "block6a"
    freeze_batchnorm: bool = True
    inputs: typing.Literal["live", "cached"] = "cached"

    def validate(self):
        super().validate()
        if self.inputs == "cached" and self.epochs > 0:
            _check("finetune.unfreeze_from", self.unfreeze_from, self.unfreeze_from != "all",
                   "a cut point of the backbone with finetune.inputs: cached (the layers below it stay frozen)")
            _check("finetune.freeze_batchnorm", self.freeze_batchnorm, self.freeze_batchnorm,
                   "true with finetune.inputs: cached (frozen layers must not change with the batch)")


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation on the test split.

    tta_flip: also report accuracy with the prediction averaged over the image and its mirror image.
    vision_options: also measure test accuracy with the photos cropped and scaled as each of Vision's options
        does (centerCrop, scaleFill, scaleFit; two more passes over the test split), for the report's "Using the
        model in your app" and the option the Core ML input's description recommends.
    worst_count: how many confidently wrong predictions to list and show.
    calibrate: fit a temperature T on the validation split (minimising its negative log-likelihood) and divide
        the model's logits by it, in the model itself, so that every exported file's probabilities carry it;
        false keeps the fine-tuned model's probabilities (T = 1).
    keep_correct: the "none of these" threshold recommended for apps is the highest confidence that keeps this
        share of the validation images the model gets right; null: recommend none.
    unknown_data: a folder or .zip/.tar.gz archive of photos that show none of the classes; the report gives the
        share of them each confidence threshold rejects. null: none.
    """

    tta_flip: bool = True
    vision_options: bool = True
    worst_count: int = 16
    batch_size: int = 64
    calibrate: bool = True
    keep_correct: float | None = 0.95
    unknown_data: str | None = None

    def validate(self):
        _check("evaluate.keep_correct", self.keep_correct,
               self.keep_correct is None or 0 < self.keep_correct <= 1, "null or a number in (0, 1]")
        _check("evaluate.worst_count", self.worst_count, 0 <= self.worst_count <= 100, "an integer in [0, 100]")
        _check("evaluate.batch_size", self.batch_size, self.batch_size >= 1, "a positive integer")


@dataclass(frozen=True)
class DistributeConfig:
    """Training (train-head, finetune) on several devices or processes with tf.distribute.

    strategy: `auto`: MirroredStrategy over the visible GPUs when there are two or more, else one device; `none`:
        one device; `mirrored`: MirroredStrategy over the visible GPUs, or, with none, over the CPU's logical
        devices (one unless TensorFlow was told to make more, as the tests do); `multi_worker`:
        MultiWorkerMirroredStrategy over worker processes, `local_workers` of them on this machine, or, with
        `local_workers: 0`, the cluster that the `TF_CONFIG` environment variable describes (one process per
        machine, each running the same command). Each replica takes `batch_size` images of every batch, so the
        global batch is `batch_size` times the replicas; the learning rate is used as configured, not scaled.
        Both are written into the stage's `training.json`.
    local_workers: with `multi_worker`, how many worker processes to start on this machine, talking over
        127.0.0.1; worker 0 (the chief) writes the stage's outputs, the others nothing. 0: none (TF_CONFIG).
    """

    strategy: typing.Literal["auto", "none", "mirrored", "multi_worker"] = "auto"
    local_workers: int = 0

    def validate(self):
        _check("distribute.local_workers", self.local_workers,
               self.local_workers == 0 or (self.local_workers >= 1 and self.strategy == "multi_worker"),
               "0, or with distribute.strategy: multi_worker a positive number of worker processes")


def _default_formats():
    return [name for name, fmt in FORMATS.items() if fmt.default]


@dataclass(frozen=True)
class ExportConfig:
    """The exported models and what they say about themselves.

    formats: any of the names in pipeline.export.formats.FORMATS; by default those whose `default` is set there
        (not the 8-bit, palettized, fp32 ML Program or full-integer variants, exported only when named).
    check_images: how many test images each export is checked on against Keras; null = all.
    calibration_images: how many training images (never val or test ones) calibrate the formats that need it
        (tflite-int8-full's activation ranges; the compressed ML Programs' bias correction): taken in turn from
        each class, spread evenly over each class's images in index order, so the choice is the same in every run.
    max_probability_difference: the largest class-probability difference from Keras an fp32 export may show.
    min_top1_agreement: the smallest fraction of checked images whose top-1 class must equal Keras's (fp32).
    reduced_min_top1_agreement, reduced_max_accuracy_drop: the same for fp16/int8 variants (the drop in test
        accuracy as a fraction, 0.005 = half a point); a variant that misses them is marked failed, not fatal.
    latency_images: how many single-image calls the mean latency of each runtime is measured over.
    convert_in_worker: convert the files in a worker process while the stage's own process checks each one as
        soon as it is written (two cores overlap the two); false converts them in the stage's process.
    """

    name: str = "MultiSnacks"
    formats: list[str] = field(default_factory=_default_formats)
    author: str = "MultiSnacks"
    license: str = "Model: MIT. Training images: CC BY 2.0 (see the dataset's credits)."
    description: str = "Classifies a photo of a snack into one of the dataset's classes."
    version: str = "1.0"
    check_images: int | None = None
    calibration_images: int = 100
    max_probability_difference: float = 1e-4
    min_top1_agreement: float = 1.0
    reduced_min_top1_agreement: float = 0.99
    reduced_max_accuracy_drop: float = 0.005
    latency_images: int = 50
    convert_in_worker: bool = True

    def validate(self):
        _check("export.name", self.name, bool(self.name) and self.name.replace("_", "").replace("-", "").isalnum(),
               "letters, digits, '-' and '_'")
        for fmt in self.formats:
            _check("export.formats", fmt, fmt in FORMATS, f"a list drawn from {sorted(FORMATS)}")
        _check("export.check_images", self.check_images, self.check_images is None or self.check_images >= 1,
               "a positive integer or null")
        _check("export.calibration_images", self.calibration_images, 1 <= self.calibration_images <= 10_000,
               "an integer from 1 to 10000 (how many training images calibrate the int8 and palettized formats; "
               "100 is plenty)")
        _check("export.max_probability_difference", self.max_probability_difference,
               0 < self.max_probability_difference <= 1, "a number in (0, 1]")
        for key in ("min_top1_agreement", "reduced_min_top1_agreement", "reduced_max_accuracy_drop"):
            _check(f"export.{key}", getattr(self, key), 0 <= getattr(self, key) <= 1, "a number in [0, 1]")
        _check("export.latency_images", self.latency_images, self.latency_images >= 1, "a positive integer")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"export.formats: {self.formats} names a format twice")


@dataclass(frozen=True)
class Config:
    """The whole configuration, one attribute per section."""

    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_head: TrainHeadConfig = field(default_factory=TrainHeadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    def validate(self):
        """Checks that involve more than one section."""
        spec = BACKBONES[self.model.backbone]
        _check("train_head.features", self.train_head.features,
               self.train_head.features == "live" or not spec.from_scratch,
               f"live for backbone {self.model.backbone}, which trains whole in train-head (no frozen features)")
        cuts = spec.cut_points
        if self.finetune.epochs > 0:  # with 0 epochs there is no fine-tuning, so no cut point to check
            _check("finetune.unfreeze_from", self.finetune.unfreeze_from,
                   self.finetune.unfreeze_from == "all" or self.finetune.unfreeze_from in cuts,
                   f"'all' or a cut point of {self.model.backbone}: {', '.join(cuts) or 'none'}")

    def section(self, name):
        """The dict of one section's resolved values."""
        return dataclasses.asdict(getattr(self, name))

    def key_section(self, name):
        """The values of section `name` (or of the one key `section.key`) that are part of a stage's cache key:
        all but locations such as model.weights_dir."""
        section_name, _, key = name.partition(".")
        values = self.section(section_name)
        kept = {f.name: values[f.name] for f in dataclasses.fields(getattr(self, section_name))
                if f.metadata.get("cache_key", True)}
        return {key: kept[key]} if key else kept

    def resolved(self, names):
        """{section: values} of the sections and `section.key`s in `names`, as a stage's config.yaml records them."""
        resolved = {}
        for name in names:
            section_name, _, key = name.partition(".")
            values = self.section(section_name)
            resolved.setdefault(section_name, {}).update({key: values[key]} if key else values)
        return resolved


def _check(key, value, ok, allowed):
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")


def _type_ok(value, hint):
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint):
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {type(None): "null", float: "a number", int: "an integer", bool: "true/false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _build_section(name, cls, values):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{name}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"config key '{name}.{key}' is unknown; allowed keys in '{name}': {sorted(known)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"config key '{name}.{key}' has value {value!r}; allowed: {_describe(hints[key])}")
    section = cls(**values)
    if hasattr(section, "validate"):
        section.validate()
    return section


def from_dict(raw):
    """Build and validate a Config from a dict of sections (missing keys take their defaults)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for name in raw:
        if name not in sections:
            raise ConfigError(f"config section '{name}' is unknown; allowed sections: {sorted(sections)}")
    cfg = Config(**{name: _build_section(name, hints[name], raw.get(name)) for name in sections})
    cfg.validate()
    return cfg


def apply_overrides(raw, overrides):
    """The raw config dict with each `section.key=value` of `overrides` set (the value read as YAML)."""
    raw = dict(raw or {})
    for item in overrides:
        name, sep, text = item.partition("=")
        parts = name.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set '{item}' is not section.key=value (for example --set finetune.epochs=5)")
        section, key = parts
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set '{item}': the value is not valid YAML ({exc})") from exc
        value = _number_or_value(value)
        current = raw.get(section)
        raw[section] = {**(current if isinstance(current, dict) else {}), key: value}
    return raw


def _number_or_value(value):
    """YAML 1.1 reads `1e-4` as a string; on the command line it means the number."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return value


def load(path=DEFAULT_CONFIG, data=None, overrides=(), weights_dir=None):
    """Load a YAML config file, apply `--set section.key=value` overrides, `--data` and `--weights-dir`, and validate.

    The overrides are validated like the file's own values, and take part in every stage's cache key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass --config PATH to an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    try:
        cfg = from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if overrides:
        try:
            cfg = from_dict(apply_overrides(raw, overrides))
        except ConfigError as exc:
            raise ConfigError(f"{path} with --set {' '.join(overrides)}: {exc}") from exc
    if data is not None:
        cfg = dataclasses.replace(cfg, data=DataConfig(path=str(data)))
    if weights_dir is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights_dir=str(weights_dir)))
    return cfg
