"""Typed errors. Each carries a one-line message naming the culprit and the fix; the CLI prints it."""


class GoodDragError(Exception):
    """Base of every error the engine raises on purpose (the CLI prints these without a traceback)."""


class BadInputError(GoodDragError):
    """The image, points or mask given by the user cannot be edited as they are."""


class ConfigError(GoodDragError):
    """A preset, component name or parameter override is unknown or out of range."""


class PluginError(GoodDragError):
    """A plugin failed to load or registered something invalid (duplicate name, missing Params)."""


class ModelNotFoundError(GoodDragError):
    """A model (or VAE, LoRA) could not be found locally and the hub cannot be reached."""


class RequirementError(GoodDragError):
    """An optional dependency, weight file or API key that a component needs is missing."""


class DivergedError(GoodDragError):
    """The latent stopped being finite (NaN/inf): the image would be black, so nothing is written."""


class OutputError(GoodDragError):
    """An output could not be written (disk full, file-size limit, read-only folder, ...): the
    message names the path and the cause; the previous results are kept."""


class GoodDragWarning(UserWarning):
    """Something the user should know: a request that will not do quite what was asked (a dropped
    preset value, a setting that cannot apply, a point outside the editable mask) or something that
    was repaired or skipped (a damaged cache retrained). Issued as Python warnings, recorded in the
    run report; the CLI prints one line each."""


class RunnerError(GoodDragError):
    """A bench runner cannot start or keep its workers (cluster unreachable, too few resources, every
    worker died)."""
