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


class GoodDragWarning(UserWarning):
    """Something was repaired or skipped and the user should know (a damaged cache retrained, a result
    not cached); the editor records these in the run report and the CLI prints them."""


class RunnerError(GoodDragError):
    """A bench runner cannot start or keep its workers (cluster unreachable, too few resources, every
    worker died)."""
