"""The stage registry: the one place that says which stages exist, in what order, and what each depends on."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.exporters import FORMATS


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    module: the module whose `run(ctx)` does the work.
    sections: the config sections whose values are part of the stage's cache key.
    upstream: the stages whose outputs it reads.
    code: modules whose source is part of the stage's cache key (its own and the helpers it relies on).
    external: the module's `fingerprint(cfg)` describes inputs from outside the artifacts (the dataset).
    """

    name: str
    module: str
    sections: tuple
    upstream: tuple
    code: tuple
    help: str
    external: bool = False


STAGES = (
    Stage("ingest", "pipeline.stages.ingest", ("data", "ingest"), (),
          ("pipeline.stages.ingest", "pipeline.dataset", "pipeline.images"),
          "Scan and check the labelled image folder; write the class list, the image index and counts.",
          external=True),
    Stage("augment", "pipeline.stages.augment", ("augment", "model"), ("ingest",),
          ("pipeline.stages.augment", "pipeline.augmentation", "pipeline.images"),
          "Resolve the ImageDataGenerator settings and draw a preview grid of augmented training images."),
    Stage("train-head", "pipeline.stages.train_head", ("model", "train_head"), ("ingest", "augment"),
          ("pipeline.stages.train_head", "pipeline.training", "pipeline.models", "pipeline.backbones",
           "pipeline.efficientnet_lite", "pipeline.torch_weights", "pipeline.activations", "pipeline.progress",
           "pipeline.augmentation", "pipeline.images"),
          "Train a new classification head on the frozen ImageNet backbone."),
    Stage("finetune", "pipeline.stages.finetune", ("model", "finetune"), ("ingest", "augment", "train-head"),
          ("pipeline.stages.finetune", "pipeline.training", "pipeline.models", "pipeline.backbones",
           "pipeline.activations", "pipeline.progress", "pipeline.augmentation", "pipeline.images"),
          "Unfreeze the backbone (whole or from a block on) and fine-tune at a lower learning rate."),
    Stage("evaluate", "pipeline.stages.evaluate", ("model", "evaluate"),
          ("ingest", "augment", "train-head", "finetune"),
          ("pipeline.stages.evaluate", "pipeline.report", "pipeline.augmentation", "pipeline.images"),
          "Measure the model on the test split: accuracy, per-class report, confusion matrix, worst predictions."),
    Stage("export", "pipeline.stages.export", ("model", "export"),
          ("ingest", "augment", "finetune", "evaluate"),
          ("pipeline.stages.export", "pipeline.exporters", *sorted({f.module for f in FORMATS.values()}),
           "pipeline.coreml_numpy", "pipeline.parity", "pipeline.models", "pipeline.augmentation",
           "pipeline.images"),
          "Convert the model to Core ML (and its variants), ONNX and TFLite, and measure each against Keras."),
)

BY_NAME = {stage.name: stage for stage in STAGES}


def upstream_closure(names):
    """The named stages and everything they depend on, in pipeline order."""
    needed = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(BY_NAME[name].upstream)
    return [stage for stage in STAGES if stage.name in needed]
