"""The Click command line: one subcommand per stage, plus `all`, `status`, `verify`, `predict`, `sweep` and `digits`; they chain."""
from __future__ import annotations

import logging
import shutil
import signal
import sys
import textwrap

import click

from pipeline import config as config_module
from pipeline import predict, quiet, sweep
from pipeline.catalog import Catalog
from pipeline.data import digits
from pipeline.environment import WEIGHTS_DIR_ENV
from pipeline.errors import PipelineError
from pipeline.export.parity import table
from pipeline.predict import RUNNABLE
from pipeline.runner import Runner, stage_names
from pipeline.stages import STAGES
from pipeline.stages import export as export_stage
from pipeline.train import distribute, view_store

log = logging.getLogger("pipeline")


@click.group(chain=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=str(config_module.DEFAULT_CONFIG),
              show_default=True, help="YAML config file.")
@click.option("--data", type=click.Path(), default=None,
              help="The dataset: a folder or .zip/.tar.gz archive (overrides data.path in the config).")
@click.option("--artifacts", type=click.Path(file_okay=False), default="artifacts", show_default=True,
              help="Folder for every stage's outputs and cache manifests.")
@click.option("--weights-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of Keras weight files to use before Keras's cache and download (overrides "
                   f"model.weights_dir, whose default is ${WEIGHTS_DIR_ENV}).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value, validated like the file's (repeatable): --set finetune.epochs=5.")
@click.option("--force", is_flag=True, help="Rerun the named stages even if they are fresh.")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
@click.pass_context
def cli(ctx, config_path, data, artifacts, weights_dir, overrides, force, verbose, quiet):
    """MultiSnacks: train an image classifier from a folder of labelled photos and export it for iOS.

    Stages run in order ingest, augment, train-head, finetune, evaluate, export. Naming a stage runs any
    stale upstream stage first; fresh stages are reused from the cache in --artifacts. Subcommands chain:
    `python -m pipeline finetune evaluate`.
    """
    ctx.obj = dict(config_path=config_path, data=data, artifacts=artifacts, weights_dir=weights_dir,
                   overrides=overrides, force=force, verbose=verbose, quiet=quiet)


def _stage_command(name, help_text):
    @cli.command(name=name, help=help_text + " Runs stale upstream stages first.")
    def command():
        return ("run", [name])

    return command


for _stage in STAGES:
    _stage_command(_stage.name, _stage.help)


@cli.command(name="all")
def all_command():
    """Run every stage, reusing fresh ones from the cache."""
    return ("run", stage_names())


@cli.command(name="status")
def status_command():
    """Show each stage: fresh, stale (and why) or never run; when it last ran, how long it took, its outputs."""
    return ("status", [])


@cli.command(name="verify")
def verify_command():
    """Measure the exported files in --artifacts against the Keras model on the test split (the parity table).

    Exits 1 if an fp32 export disagrees with Keras beyond the export thresholds, or a file's interface is wrong,
    or a file is damaged or cannot be read (its row says why).
    """
    return ("verify", [])


class _OptionsAfterArguments(click.Command):
    """A subcommand of the chained group whose options may follow its argument (`predict photo.jpg --top-k 5`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        extra["allow_interspersed_args"] = True  # chained groups turn this off for every subcommand
        return super().make_context(info_name, args, parent, **extra)


@cli.command(name="digits", cls=_OptionsAfterArguments)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--size", type=click.IntRange(min=8), default=28, show_default=True, help="Side of the written PNGs.")
def digits_command(out, size):
    """Write scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes) as a train/val/test folder of
    PNGs, upscaled to --size, for `--data OUT` (for example with configs/mynet.yaml). Needs no network."""
    return ("digits", [dict(out=out, size=size)])


@cli.command(name="sweep")
@click.option("--set", "grid", multiple=True, metavar="SECTION.KEY=V1,V2,...",
              help="Values to try for one config key (repeatable; every combination runs).")
@click.option("--random", "sample", type=click.IntRange(min=1), default=None,
              help="Run only this many combinations, drawn at random from the grid.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --random draw.")
@click.option("--until", type=click.Choice(["train-head", "finetune"]), default="finetune", show_default=True,
              help="The last stage each combination runs (a sweep never evaluates on the test split).")
@click.option("--apply", "apply_best", is_flag=True,
              help="Then run the whole pipeline in --artifacts with the best combination.")
def sweep_command(grid, sample, seed, until, apply_best):
    """Try every combination of config values, choosing by validation accuracy; write sweep.csv, sweep.png
    (the runs' validation curves overlaid) and best.yaml under --artifacts/sweep."""
    return ("sweep", [dict(grid=grid, sample=sample, seed=seed, until=until, apply=apply_best)])


@cli.command(name="predict", cls=_OptionsAfterArguments)
@click.argument("path", type=click.Path())
@click.option("--format", "format_name", type=click.Choice(RUNNABLE), default="coreml", show_default=True,
              help="Which exported file answers (on Linux, Core ML files and ML Programs run in the NumPy checkers).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Labels shown per image.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Say \"not sure\" when the best label's probability is below this (default: the threshold the "
                   "evaluate stage recommended; 0: never).")
def predict_command(path, format_name, top_k, threshold):
    """Print the top labels of an image, or of every image in a folder, from one exported file; "not sure" below
    the confidence threshold."""
    return ("predict", [dict(path=path, format_name=format_name, top_k=top_k, threshold=threshold)])


@cli.result_callback()
@click.pass_context
def _execute(ctx, results, **_):
    opts = ctx.obj
    _setup_logging(opts["verbose"], opts["quiet"])
    quiet.configure(opts["verbose"])
    try:
        cfg = config_module.load(opts["config_path"], data=opts["data"], overrides=opts["overrides"],
                                 weights_dir=opts["weights_dir"])
        runner = Runner(cfg, opts["artifacts"])
        targets = [name for kind, names in results if kind == "run" for name in names]
        if targets and cfg.distribute.strategy == "multi_worker" and not cfg.distribute.local_workers:
            # A cluster from TF_CONFIG: this process is one of its workers, and its strategy has to exist before
            # TensorFlow runs any other operation.
            with quiet.native_stderr():
                chosen = distribute.strategy(cfg.distribute)
            # The machines compute the feature-store entries they need together, each a share, and exchange them.
            runner.store.group = view_store.across_machines(chosen, runner.store)
            runner.cluster = distribute.Cluster(chosen)
        if targets or any(kind in ("verify", "predict", "sweep") for kind, _ in results):
            quiet.load_tensorflow()
        if targets:
            runner.run(targets, force=set(targets) if opts["force"] else set())
        if any(kind == "status" for kind, _ in results):
            click.echo(format_status(runner.status()))
        for kind, items in results:
            if kind == "verify":
                _verify(cfg, opts["artifacts"])
            for item in items if kind == "sweep" else []:
                _sweep(opts, item)
            for item in items if kind == "digits" else []:
                summary = digits.write_digits(item["out"], size=item["size"])
                click.echo(f"wrote {summary['images']} digit images ({summary['size']} px) to {item['out']}: "
                           + ", ".join(f"{split} {n}" for split, n in summary["splits"].items()))
            for item in items if kind == "predict" else []:
                predictor = predict.load_predictor(item["format_name"], cfg, opts["artifacts"])
                results_ = predict.top_labels(predictor, predict.image_files(item["path"]), item["top_k"])
                threshold = item["threshold"]
                if threshold is None:
                    threshold = predict.recommended_threshold(item["format_name"], cfg, opts["artifacts"])
                click.echo(predict.format_results(results_, threshold))
    except PipelineError as exc:
        click.echo(error_text(exc, _terminal_width(sys.stderr)), err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        click.echo(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}: the running stage was not "
                   "saved; its previous outputs are untouched", err=True)
        sys.exit(128 + signum)


def error_text(exc, width=None):
    """The line printed for a PipelineError: `error: ` and its message, wrapped to `width` columns (None: one line
    per line of the message) with continuation lines indented; paths and other long words are never split."""
    text = f"error: {exc}"
    if width is None:
        return text
    return "\n".join(textwrap.fill(line, width, initial_indent="  " if i else "", subsequent_indent="  ",
                                    break_long_words=False, break_on_hyphens=False)
                      for i, line in enumerate(text.splitlines()))


def _terminal_width(stream):
    """The width to wrap messages to on `stream`: its terminal's (at most 100), or None when it is not a terminal,
    so that redirected output keeps each message on one line for grep and log collectors."""
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return min(shutil.get_terminal_size((100, 24)).columns, 100)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised in the main thread so that it unwinds like Ctrl-C: temporary folders removed,
    child processes stopped, previous outputs untouched."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


def _sweep(opts, item):
    def make_config(combo):
        overrides = [*opts["overrides"], *(f"{key}={value}" for key, value in combo.items())]
        return config_module.load(opts["config_path"], data=opts["data"], overrides=overrides,
                                  weights_dir=opts["weights_dir"])

    grid = sweep.parse_grid(item["grid"])
    rows, best, best_path = sweep.run(make_config, opts["artifacts"], grid, item["until"], item["sample"],
                                      item["seed"])
    columns = [*grid, "val_accuracy", "val_loss", "best_epoch", "minutes"]
    click.echo(format_status([{c: (f"{r[c]:.4f}" if c.startswith("val_") else r[c]) for c in columns}
                              for r in rows], columns))
    click.echo(f"best: {', '.join(f'{k}={best[k]}' for k in grid)}; its config: {best_path}")
    if item["apply"]:
        sweep.apply(make_config({k: best[k] for k in grid}), best, opts["artifacts"])


def _verify(cfg, artifacts):
    rows = export_stage.verify(cfg, Catalog(artifacts))
    click.echo(table(rows), nl=False)
    export_stage.stop_on_failures(rows, show_table=False)  # just printed


def format_status(rows, columns=("stage", "state", "why", "last_run", "took", "outputs")):
    """Rows (dicts) as an aligned text table of `columns` (by default the status table's)."""
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _setup_logging(verbose, quiet_flag):
    quiet.log_to_stderr(logging.DEBUG if verbose else logging.WARNING if quiet_flag else logging.INFO)


def main():
    """Entry point for `python -m pipeline`."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    cli(prog_name="python -m pipeline")
