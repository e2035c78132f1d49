"""The pipeline's exceptions: one base class, small subclasses whose messages name the file and the fix."""


class PipelineError(Exception):
    """Any error the pipeline reports to the user as a message rather than a traceback."""


class ConfigError(PipelineError):
    """A config file or option is invalid: the message names the key, the value and what is allowed."""


class DataError(PipelineError):
    """The dataset cannot be used: the message names the folder or file and the accepted layouts."""


class WeightsError(PipelineError):
    """Pretrained weights are missing: the message names the file wanted and where to put it."""


class ExportError(PipelineError):
    """An export failed or its exported file disagrees with the Keras model."""


class ArtifactsError(PipelineError):
    """The artifacts folder cannot be used: the message names the folder and the fix."""

    @classmethod
    def unwritable(cls, folder, cause):
        """The error for an artifacts folder that cannot be written, with the OS's `cause`."""
        from pathlib import Path

        return cls(f"artifacts folder '{Path(folder).absolute()}' is not writable ({cause}); pass --artifacts to a "
                   "writable folder or fix its permissions")

    @classmethod
    def no_space(cls, folder, stage, cause):
        """The error for a disk that filled up while `stage` wrote to the artifacts folder `folder`."""
        import shutil
        from pathlib import Path

        folder = Path(folder).absolute()
        try:
            free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free now"
        except OSError:
            free = "free space unknown"
        return cls(f"no space left on the disk of artifacts folder '{folder}' ({free}) while {stage} wrote "
                   f"'{getattr(cause, 'filename', None) or folder}'; {stage} was not saved and its previous outputs "
                   "are untouched; free some space, or pass --artifacts to a folder on a larger disk")


class TrainingError(PipelineError):
    """A training stage could not finish (a worker process died): the message says what to run next."""
