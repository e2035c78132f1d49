"""The Click command line: one subcommand per stage, plus `all`, `status`, `verify` and `predict`; they chain."""
from __future__ import annotations

import logging
import sys

import click

from pipeline import config as config_module
from pipeline import predict, quiet
from pipeline.catalog import Catalog
from pipeline.errors import PipelineError
from pipeline.parity import table
from pipeline.predict import RUNNABLE
from pipeline.stages import export as export_stage
from pipeline.runner import Runner, stage_names
from pipeline.stages import STAGES

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
                   f"model.weights_dir, whose default is ${config_module.WEIGHTS_DIR_ENV}).")
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

    Exits 1 if an fp32 export disagrees with Keras beyond the export thresholds or a file's interface is wrong.
    """
    return ("verify", [])


class _OptionsAfterArguments(click.Command):
    """A subcommand of the chained group whose options may follow its argument (`predict photo.jpg --top-k 5`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        extra["allow_interspersed_args"] = True  # chained groups turn this off for every subcommand
        return super().make_context(info_name, args, parent, **extra)


@cli.command(name="predict", cls=_OptionsAfterArguments)
@click.argument("path", type=click.Path())
@click.option("--format", "format_name", type=click.Choice(RUNNABLE), default="coreml", show_default=True,
              help="Which exported file answers (Core ML runs in the NumPy checker on Linux).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Labels shown per image.")
def predict_command(path, format_name, top_k):
    """Print the top labels of an image, or of every image in a folder, from one exported file."""
    return ("predict", [dict(path=path, format_name=format_name, top_k=top_k)])


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
        if targets or any(kind in ("verify", "predict") for kind, _ in results):
            quiet.load_tensorflow()
        if targets:
            runner.run(targets, force=set(targets) if opts["force"] else set())
        if any(kind == "status" for kind, _ in results):
            click.echo(format_status(runner.status()))
        for kind, items in results:
            if kind == "verify":
                _verify(cfg, opts["artifacts"])
            for item in items if kind == "predict" else []:
                predictor = predict.load_predictor(item["format_name"], cfg, opts["artifacts"])
                results_ = predict.top_labels(predictor, predict.image_files(item["path"]), item["top_k"])
                click.echo(predict.format_results(results_))
    except PipelineError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted: the running stage was not saved; its previous outputs are untouched", err=True)
        sys.exit(130)


def _verify(cfg, artifacts):
    rows = export_stage.verify(cfg, Catalog(artifacts))
    click.echo(table(rows), nl=False)
    export_stage.stop_on_failures(rows, show_table=False)  # just printed


def format_status(rows):
    """The status rows as an aligned text table."""
    columns = ("stage", "state", "why", "last_run", "took", "outputs")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _setup_logging(verbose, quiet):
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main():
    """Entry point for `python -m pipeline`."""
    cli(prog_name="python -m pipeline")
