"""Stage 1, ingest: scan a labelled image folder, check every file, and write the class list and image index.

The source folder is only ever read. Labels are the sorted class folder names; `classes.txt` is the one file
every later stage and every export reads them from. Symbolic links that lead outside the dataset folder are
listed and skipped, never read, unless ingest.follow_symlinks is set.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

from pipeline import fileio
from pipeline.data import dataset
from pipeline.data.fingerprint import source_fingerprint, unfollowed_link
from pipeline.data.images import BadImage, inspect_bytes, is_image_name
from pipeline.errors import DataError

log = logging.getLogger("pipeline.ingest")

INDEX_COLUMNS = ("split", "label", "path", "width", "height", "bytes", "sha256", "converted")
NESTED_ARCHIVE = ("an archive inside the dataset; not unpacked: unpack it into its class folder, or pass the archive "
                  "itself as --data")


def fingerprint(cfg, sources_dir=None):
    """The dataset's identity for the cache key (pipeline.data.fingerprint.source_fingerprint of data.path), or
    the snacks download's when data.path is null.

    sources_dir: where archives are unpacked (the catalog's); given, a damaged unpacked copy of the archive
    changes the key, so that ingest runs again and unpacks it anew.
    """
    if cfg.data.path is None:
        return {"download": dataset.SNACKS_URL, "counts": dataset.SNACKS_COUNTS}
    return source_fingerprint(cfg.data.path, sources_dir, cfg.ingest.follow_symlinks)


def resolve_source(cfg, sources_dir):
    """The dataset folder to scan: the configured folder, an unpacked archive, or the downloaded snacks."""
    if cfg.data.path is None:
        return dataset.download_snacks(cfg.ingest)
    path = Path(cfg.data.path).resolve()
    if path.is_file() or dataset.is_archive(path):
        if not dataset.is_archive(path):
            raise DataError(f"dataset path '{path}' is a file but not a .zip or .tar.gz archive; "
                            f"{dataset.LAYOUTS_HELP}")
        return dataset.unpack_archive(path, sources_dir, cfg.ingest)
    return path


def _skipped_link(path, root, cfg, ignored):
    reason = unfollowed_link(path, root, cfg.ingest.follow_symlinks)
    if reason:
        ignored.append({"path": str(path), "link": os.readlink(path), "reason": reason})
    return bool(reason)


def _class_folders(split_dir, root, cfg, ignored):
    folders = {}
    for entry in dataset.list_folder(split_dir):
        if _skipped_link(entry, root, cfg, ignored):
            continue
        if entry.is_dir() and not entry.name.startswith((".", "__MACOSX")):
            label = dataset.label_of(entry.name)
            if label in folders:
                raise _twin_error(folders[label], entry, label)
            folders[label] = entry
        elif entry.is_file() and dataset.is_archive(entry):
            ignored.append({"path": str(entry), "reason": NESTED_ARCHIVE})
        else:
            ignored.append({"path": str(entry), "reason": "not inside a class folder"})
    return folders


def _twin_error(first, second, label):
    # ascii() shows the two names' code points, which print alike
    return DataError(f"class folders '{first}' and '{second}' differ only in Unicode normalisation "
                     f"({ascii(first.name)} and {ascii(second.name)}), so both would be class '{label}'; move the "
                     "images of one into the other and remove it, or rename one")


def _scan_folder(folder, label, split, root, cfg, ignored, bad):
    rows = []
    for path in dataset.walk(folder):
        if _skipped_link(path, root, cfg, ignored):
            continue
        if path.is_symlink() and path.is_dir():
            ignored.append({"path": str(path), "link": os.readlink(path),
                            "reason": "symbolic link to a folder inside a class folder; not followed"})
            continue
        if not path.is_file():
            continue
        if dataset.is_archive(path):
            ignored.append({"path": str(path), "reason": NESTED_ARCHIVE})
            continue
        if not is_image_name(path):
            ignored.append({"path": str(path), "reason": "not an image file name"})
            continue
        try:
            data = _read_image(path, cfg.ingest)
            info = inspect_bytes(data, cfg.ingest.max_image_pixels)
        except OSError as exc:
            _bad_image(path, f"cannot be read: {dataset.os_reason(exc)}",
                       f"fix its permissions (chmod a+r '{path}') or remove the file", cfg, bad, exc)
            continue
        except BadImage as exc:
            _bad_image(path, str(exc), "fix or remove the file", cfg, bad, exc)
            continue
        rows.append({"split": split, "label": label, "path": str(path), "width": info.width,
                     "height": info.height, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                     "converted": info.converted})
    return rows


def _read_image(path, limits):
    size = path.stat().st_size
    if size > limits.max_file_mb * 1e6:
        raise BadImage(f"absurdly large file: {size / 1e6:.0f} MB (ingest.max_file_mb is {limits.max_file_mb})")
    return path.read_bytes()


def _bad_image(path, reason, fix, cfg, bad, cause):
    """List and skip a bad image, or with ingest.on_bad_image: fail, stop with an error naming it and the fix."""
    if cfg.ingest.on_bad_image == "fail":
        raise DataError(f"bad image '{path}': {reason}; {fix}, or set ingest.on_bad_image: skip to list and skip "
                        "such files") from cause
    bad.append({"path": str(path), "reason": reason})
    log.warning("skipping bad image %s: %s", path, reason)


def check_folder_links(layout, cfg):
    """Refuse a wrapper or split folder reached through a symbolic link that leads outside the dataset folder."""
    if cfg.ingest.follow_symlinks:
        return
    root = layout.source.resolve()
    for folder in (layout.root, *layout.split_dirs.values()):
        parts = folder.relative_to(layout.source).parts
        for step in (layout.source.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)):
            if not step.resolve().is_relative_to(root):
                raise DataError(f"dataset folder '{step}' is a symbolic link to '{step.resolve()}', outside the "
                                f"dataset folder '{root}'; ingest does not follow such links: set "
                                "ingest.follow_symlinks: true, or pass --data to a folder that holds them all")


def scan(layout, cfg):
    """Check every file of a dataset folder; return image rows, ignored files, bad images and notes."""
    ignored, bad, notes = [], [], []
    rows = []
    root = layout.source.resolve()
    if layout.kind == "splits":
        for split, split_dir in layout.split_dirs.items():
            for label, folder in _class_folders(split_dir, root, cfg, ignored).items():
                log.debug("scanning %s/%s", split, label)
                rows += _scan_folder(folder, label, split, root, cfg, ignored, bad)
        if "test" not in layout.split_dirs:
            notes.append(f"no test/ folder: the test split was made from the training images "
                         f"(ingest.test_ratio {cfg.ingest.test_ratio}, by content hash)")
            for row in rows:
                if row["split"] == "train" and dataset.assign_split(row["sha256"], cfg.ingest.seed, 0.0,
                                                                    cfg.ingest.test_ratio) == "test":
                    row["split"] = "test"
    else:
        notes.append(f"no split folders: val and test were made per class by content hash "
                     f"(ingest.val_ratio {cfg.ingest.val_ratio}, ingest.test_ratio {cfg.ingest.test_ratio})")
        for label, folder in _class_folders(layout.root, root, cfg, ignored).items():
            log.debug("scanning %s", label)
            for row in _scan_folder(folder, label, "train", root, cfg, ignored, bad):
                row["split"] = dataset.assign_split(row["sha256"], cfg.ingest.seed,
                                                    cfg.ingest.val_ratio, cfg.ingest.test_ratio)
                rows.append(row)
    return rows, ignored, bad, notes


def check(rows, layout, cfg):
    """Classes, counts, warnings (missing or empty classes, imbalance, identical images: label conflicts, leakage
    across splits, duplicates) and the number of leaks."""
    warnings = []
    counts = defaultdict(Counter)
    for row in rows:
        counts[row["label"]][row["split"]] += 1
    all_labels = set(counts)
    root = layout.source.resolve()
    for split_dir in layout.split_dirs.values() if layout.kind == "splits" else [layout.root]:
        all_labels |= set(_class_folders(split_dir, root, cfg, []))
    classes = sorted(label for label in all_labels if counts[label]["train"] > 0)
    for label in sorted(all_labels - set(classes)):
        n = sum(counts[label].values())
        warnings.append(f"class '{label}' has no training images and is left out"
                        + (f" ({n} images in other splits dropped)" if n else " (empty)"))
    if len(classes) < 2:
        raise DataError(f"dataset '{layout.root}' has {len(classes)} class(es) with training images; at least two "
                        f"are needed; {dataset.LAYOUTS_HELP}")
    for label in classes:
        for split in dataset.SPLITS:
            if counts[label][split] == 0:
                warnings.append(f"class '{label}' has no images in the {split} split")
    largest = max(counts[label]["train"] for label in classes)
    for label in classes:
        if counts[label]["train"] < cfg.ingest.imbalance_ratio * largest:
            warnings.append(f"class imbalance: '{label}' has {counts[label]['train']} training images, "
                            f"less than {cfg.ingest.imbalance_ratio:g} x the largest class ({largest}); to make "
                            "it count as much, set train_head.class_weight (and finetune.class_weight) to "
                            "balanced, or train_head.oversample (and finetune.oversample) to true")
    conflicts, leaks, duplicates = identical_images(rows)
    warnings += [_conflict_warning(group, layout.root) for group in conflicts]
    for group in leaks:
        warnings.append("leakage: the same image is in " + ", ".join(f"{r['split']} ({r['path']})" for r in group))
    if duplicates:
        warnings.append(f"{len(duplicates)} image(s) appear more than once within one split")
    return classes, counts, warnings, len(leaks)


def identical_images(rows):
    """The groups of byte-identical image rows (the same sha256), each under one heading only: label conflicts
    (more than one label), leaks (one label, more than one split) and duplicates (one label, one split).

    A label conflict is never also counted as a leak or a duplicate: its labels are to be fixed first, and a copy
    kept in two splits, or twice in one, is reported as such on the next run.
    """
    by_hash = defaultdict(list)
    for row in rows:
        by_hash[row["sha256"]].append(row)
    conflicts, leaks, duplicates = [], [], []
    for group in by_hash.values():
        if len({r["label"] for r in group}) > 1:
            conflicts.append(group)
        elif len({r["split"] for r in group}) > 1:
            leaks.append(group)
        elif len(group) > 1:
            duplicates.append(group)
    return conflicts, leaks, duplicates


def _conflict_warning(group, root):
    named = [f"'{_shown(r['path'], root)}' ({r['label']})" for r in group]
    return (f"label conflict: the same image is {', '.join(named[:-1])} and {named[-1]}; "
            "keep it in one class only")


def _shown(path, root):
    """A file's path as shown in a message: relative to the dataset folder, as the user arranged it."""
    path = Path(path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _warned(item):
    """Whether an ignored file gets a warning of its own: a link not followed, an archive not unpacked (photos the
    user meant to include), unlike a stray non-image such as .DS_Store."""
    return "link" in item or item["reason"] == NESTED_ARCHIVE


def run(ctx):
    """Scan and check the dataset; write classes.txt, index.csv, counts.csv and ingest_report.json."""
    cfg, out = ctx.cfg, ctx.out
    source = resolve_source(cfg, ctx.sources_dir)
    layout = dataset.detect_layout(source)
    check_folder_links(layout, cfg)
    log.info("scanning %s (%s layout)", layout.root, "split folders" if layout.kind == "splits" else "class folders")
    rows, ignored, bad, notes = scan(layout, cfg)
    classes, counts, warnings, leaks = check(rows, layout, cfg)
    conflicts = len(identical_images(rows)[0])
    for message in notes:  # where the splits came from: information, not a problem
        log.info(message)
    warned = [item for item in ignored if _warned(item)]
    for item in warned:
        log.warning("ignoring %s: %s", item["path"], item["reason"])
    for message in warnings:
        log.warning(message)
    rows = [r for r in rows if r["label"] in classes]

    out.write_classes(classes)
    out.write_index(INDEX_COLUMNS, rows)
    fileio.write_csv(out.counts, ("label",) + dataset.SPLITS,
                     [{"label": c, **{s: counts[c][s] for s in dataset.SPLITS}} for c in classes])
    split_totals = {s: sum(counts[c][s] for c in classes) for s in dataset.SPLITS}
    fileio.write_json(out.report, {
        "source": str(layout.root), "layout": layout.kind, "classes": classes, "images": split_totals,
        "notes": notes, "warnings": warnings, "bad_images": bad, "ignored_files": ignored,
        "converted": [{"path": r["path"], "converted": r["converted"]} for r in rows if r["converted"]],
        "leaks": leaks, "label_conflicts": conflicts,
    })
    return {
        "message": _summary(classes, rows, split_totals, bad, ignored, warned, warnings, out.report.name),
        "classes": len(classes), "images": split_totals, "bad_images": len(bad), "ignored_files": len(ignored),
        "leaks": leaks, "label_conflicts": conflicts,
    }


def _summary(classes, rows, split_totals, bad, ignored, warned, warnings, report_name):
    """The stage's summary line. Its counts of bad images and of other warnings are those of the WARNING lines of
    each kind; of the ignored files (all listed in the report) it says how many had a WARNING line."""
    ignored_text = f"{len(ignored)} file(s) ignored"
    if ignored:
        ignored_text += f" ({len(warned)} warned about; all listed in {report_name})"
    return (f"{len(classes)} classes, {len(rows)} images (train {split_totals['train']} / val {split_totals['val']} "
            f"/ test {split_totals['test']}), {len(bad)} bad image(s) skipped, {ignored_text}, "
            f"{len(warnings)} other warning(s)")
