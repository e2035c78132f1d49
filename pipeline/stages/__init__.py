"""The stage registry: the one place that says which stages exist, in what order, and what each depends on."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.export.formats import FORMATS


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    module: the module whose `run(ctx)` does the work.
    sections: the config sections whose values are part of the stage's cache key; `section.key` names one
        key of a section, for a stage that reads only that one.
    upstream: the stages whose outputs it reads.
    dynamic_imports: modules it imports by name at run time, which reading its imports cannot find. The
        source of its module and of every package module these import, directly or not, is part of its cache
        key (pipeline.code_deps).
    external: a module whose `fingerprint(cfg, sources_dir)` describes the stage's inputs from outside the artifacts
        (the dataset, the unknown photos; sources_dir: where the artifacts keep unpacked archives), or None. A
        module that does not import TensorFlow: every run computes the key.
    store_only: config sections the stage reads only to choose what else it computes into the feature store for
        a later stage (whose own key holds them); its outputs do not depend on them, so its key does not either.
    """

    name: str
    module: str
    sections: tuple
    upstream: tuple
    help: str
    external: str | None = None
    dynamic_imports: tuple = ()
    store_only: tuple = ()

    def code_modules(self):
        """Every package module whose source can change what this stage computes."""
        from pipeline.code_deps import closure

        # The runner hands every stage its files as the catalog's classes, whose writers shape the outputs.
        return closure([self.module, "pipeline.catalog", *self.dynamic_imports])


STAGES = (
    Stage("ingest", "pipeline.stages.ingest", ("data", "ingest"), (),
          "Scan and check the labelled image folder; write the class list, the image index and counts.",
          external="pipeline.stages.ingest"),
    Stage("augment", "pipeline.stages.augment", ("augment", "model.backbone", "model.image_size"), ("ingest",),
          "Resolve the ImageDataGenerator settings and draw a preview grid of augmented training images."),
    Stage("train-head", "pipeline.stages.train_head", ("model", "train_head", "distribute"), ("ingest", "augment"),
          "Train a new classification head on the frozen ImageNet backbone.", store_only=("finetune",)),
    Stage("finetune", "pipeline.stages.finetune", ("model", "finetune", "distribute"),
          ("ingest", "augment", "train-head"),
          "Unfreeze the backbone (whole or from a cut point on) and fine-tune at a lower learning rate."),
    Stage("evaluate", "pipeline.stages.evaluate",
          ("model", "evaluate", "export.name", "ingest.max_archive_gb", "ingest.max_compression_ratio"),
          ("ingest", "augment", "train-head", "finetune"),
          "Measure the model on the test split (accuracy, per-class report, confusion matrix, worst predictions); "
          "calibrate its confidence and recommend a \"none of these\" threshold.",
          external="pipeline.confidence.unknown"),
    Stage("export", "pipeline.stages.export", ("model", "train_head", "finetune", "export"),
          ("ingest", "augment", "evaluate"),
          "Convert the model to Core ML (and its variants), ONNX and TFLite, and measure each against Keras.",
          dynamic_imports=tuple(sorted({f.module for f in FORMATS.values()}))),
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
