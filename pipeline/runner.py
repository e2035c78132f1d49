"""Runs stages: freshness from manifests, atomic stage folders, timing, logging and the summary line."""
from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline import code_deps, fileio, local_workers
from pipeline.cache.feature_store import FeatureStore
from pipeline.cache.lock import holding
from pipeline.cache.sealed_folder import SealedFolder, first_difference, read_manifest
from pipeline.catalog import MANIFEST, Catalog
from pipeline.errors import ArtifactsError
from pipeline.stages import STAGES, upstream_closure

log = logging.getLogger("pipeline")


@dataclass
class StageContext:
    """What a stage function gets: the config, its upstream stages' files, its own output files, the folder
    where dataset archives are unpacked (ingest's; it outlives any one run), the stage's cache key (its config,
    code and inputs digests), the store of features kept between runs (pipeline.cache.feature_store),
    each upstream stage's output digests from its manifest ({stage: {file: SHA-256}}), and the folder where it
    may keep state to go on from after a kill (kept while the stage's key stays the same, removed when it
    completes)."""

    cfg: object
    inputs: dict
    out: object
    sources_dir: Path | None = None
    key: dict | None = None
    store: FeatureStore | None = None
    upstream: dict | None = None
    backup: Path | None = None


@dataclass
class Freshness:
    """Whether a stage's cached outputs can be reused, and why not."""

    state: str  # fresh | stale | never run
    reasons: list
    key: dict
    manifest: dict | None


class Runner:
    """Plans and runs stages against one config and one artifacts folder.

    store: the folder of the feature store its stages share with other runs (default: the artifacts folder's);
    a sweep's combinations share the main artifacts' store.
    """

    cluster = None
    """In a cluster whose every machine runs this command (TF_CONFIG), its pipeline.train.distribute.Cluster: a
    stage that trains together (under the `distribute` section) runs in every worker when one needs it
    (`cluster.any_worker`), and a worker lost is one line (`cluster.failure`); None in one process."""

    def __init__(self, cfg, artifacts="artifacts", store=None):
        self.cfg = cfg
        self.catalog = Catalog(artifacts)
        self.store = FeatureStore(store or self.catalog.feature_store)

    # -- keys and manifests -------------------------------------------------------------------------
    def key(self, stage):
        """The parts of a stage's cache key: config, code and inputs digests."""
        external = (importlib.import_module(stage.external).fingerprint(self.cfg, self.catalog.sources)
                    if stage.external else None)
        upstream = {}
        for name in stage.upstream:
            manifest = self.manifest(name)
            upstream[name] = manifest["outputs"] if manifest else None
        return {
            "config": fileio.sha256_json({s: self.cfg.key_section(s) for s in stage.sections}),
            "code": code_deps.source_digest(stage.code_modules()),
            "inputs": fileio.sha256_json({"upstream": upstream, "external": external}),
        }

    def manifest(self, name):
        """The manifest of a stage's cached outputs, or None if absent or unreadable (a cache miss)."""
        files = self.catalog.stage(name)
        path = files.manifest
        try:
            manifest = read_manifest(files.root, MANIFEST, "outputs")
            if manifest is not None and "key" not in manifest:
                raise ValueError("incomplete manifest")
            return manifest
        except (ValueError, OSError) as exc:
            log.warning("manifest %s is unreadable (%s); treating %s as never run", path, exc, name)
            return None

    def freshness(self, stage):
        """Compare a stage's current key and outputs with its manifest."""
        key = self.key(stage)
        manifest = self.manifest(stage.name)
        if manifest is None:
            return Freshness("never run", ["never run"], key, None)
        reasons = [f"{part} changed" for part in ("config", "code", "inputs") if manifest["key"].get(part) != key[part]]
        difference = first_difference(self.catalog.stage(stage.name).root, manifest["outputs"])
        if difference:
            reasons.append(f"output {difference}")
        return Freshness("stale" if reasons else "fresh", reasons, key, manifest)

    # -- running ------------------------------------------------------------------------------------
    def run(self, targets, force=()):
        """Run the named stages, after any stale upstream stage; reuse fresh ones. Returns what ran.

        Holds the artifacts folder's lock throughout, so a second run on the same folder stops with a clear error
        instead of writing beside this one; first removes what killed runs left, and keeps every temporary file of
        the run (its converters' included) inside the artifacts folder.
        """
        with holding(self.catalog.root):
            self._remove_leftovers()
            return self._run(targets, force)

    def _remove_leftovers(self):
        for leftover in self.catalog.leftovers(stage_names()):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.store.root == self.catalog.feature_store:  # the store is this folder's, so the lock covers it
            self.store.remove_leftovers()

    def _run(self, targets, force):
        ran = []
        for stage in upstream_closure(targets):
            status = self.freshness(stage)
            forced = stage.name in force
            if self.cluster is not None and "distribute" in stage.sections:
                needed = self.cluster.any_worker(status.state != "fresh" or forced)
                if needed and status.state == "fresh" and not forced:
                    log.info("%-10s fresh here, but another machine of the cluster runs it", stage.name)
                    forced = True
            if status.state == "fresh" and not forced:
                log.info("%-10s fresh, skipping (ran %s, took %s)", stage.name,
                         status.manifest.get("finished", "?"), _duration(status.manifest.get("duration_s")))
                continue
            if status.state == "fresh":  # forced: run it again from the start, not from a backup it left
                self._remove_backups(stage.name)
            why = "forced" if forced else ", ".join(status.reasons)
            log.info("%-10s running (%s)", stage.name, why)
            self._run_stage(stage, status.key)
            ran.append(stage.name)
        return ran

    def _run_stage(self, stage, key):
        module = importlib.import_module(stage.module)
        scratch = self.catalog.scratch(stage.name)
        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an interrupted run
        final = self.catalog.stage(stage.name).root
        sealed = SealedFolder(final, scratch, MANIFEST, "outputs")
        _make_scratch(sealed.path, final, self.catalog.root)
        inputs = {name: self.catalog.stage(name) for name in stage.upstream}
        upstream = {name: (self.manifest(name) or {}).get("outputs") for name in stage.upstream}
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        try:
            with sealed as folder, fileio.temporary_files_in(self.catalog.temp):
                out = self.catalog.stage(stage.name, folder.path)
                context = StageContext(self.cfg, inputs, out, self.catalog.sources, key, self.store, upstream,
                                       self._backup_folder(stage.name, key))
                workers = local_workers.count(self.cfg, stage)
                summary = (local_workers.run_stage(stage, context, workers) if workers else module.run(context)) or {}
                duration = time.monotonic() - t0
                resolved = self.cfg.resolved(stage.sections)
                fileio.write_text(out.resolved_config, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
                manifest = folder.seal({
                    "stage": stage.name, "key": key, "summary": summary,
                    "started": started.isoformat(timespec="seconds"),
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "duration_s": round(duration, 2),
                })
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ArtifactsError.no_space(self.catalog.root, stage.name, exc) from exc
            raise
        except Exception as exc:
            lost = self.cluster.failure(stage.name, exc) if self.cluster is not None else None
            if lost is None:
                raise
            raise lost from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self._remove_backups(stage.name)
        log.info("%-10s done in %s: %s", stage.name, _duration(duration), summary.get("message", ""))
        return manifest

    def _remove_backups(self, name):
        for folder in self.catalog.backups(name):
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # the backups' folder too, once no stage has one
            self.catalog.backups_root.rmdir()

    def _backup_folder(self, name, key):
        """Stage `name`'s backup folder for `key` (made by the stage when it first backs up), after removing
        those of its other keys: a changed config, code or input never goes on from an older run's state."""
        folder = self.catalog.backup(name, fileio.sha256_json(key)[:16])
        for other in self.catalog.backups(name):
            if other != folder:
                shutil.rmtree(other, ignore_errors=True)
        return folder

    # -- status -------------------------------------------------------------------------------------
    def status(self):
        """One row per stage: name, state, reasons, last run, duration, main outputs."""
        rows = []
        stale_upstream = set()
        for stage in STAGES:
            status = self.freshness(stage)
            reasons = list(status.reasons) if status.state != "fresh" else []
            if status.state == "fresh" and any(up in stale_upstream for up in stage.upstream):
                status.state, reasons = "stale", ["upstream stale"]
            if status.state != "fresh":
                stale_upstream.add(stage.name)
            m = status.manifest or {}
            rows.append({
                "stage": stage.name, "state": status.state, "why": ", ".join(reasons),
                "last_run": m.get("finished", "-"), "took": _duration(m.get("duration_s")),
                "outputs": ", ".join(k for k in m.get("outputs", {}) if "/" not in k and k not in
                                     ("config.yaml",))[:80] or "-",
            })
        return rows


def _make_scratch(tmp, final, artifacts):
    """Create a stage's temporary folder, having checked that the finished one will be able to replace `final`
    (moving a folder needs write access to it), so that no stage runs only to fail at the end."""
    try:
        if final.exists() and not os.access(final, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(errno.EACCES, "cannot replace the stage folder", str(final))
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise ArtifactsError.unwritable(artifacts, exc) from exc


def _duration(seconds):
    if seconds is None:
        return "-"
    seconds = float(seconds)
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def stage_names():
    """The names of all stages, in pipeline order."""
    return [s.name for s in STAGES]

