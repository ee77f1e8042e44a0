"""Errors a user can cause (bad flags, bad files). They end the run with exit code 2 and one line."""


class MpmpError(Exception):
    """A problem with the user's input: printed as one line on every rank, exit code 2."""

    exit_code = 2


class ConfigError(MpmpError):
    """A flag or a combination of flags that cannot work."""


class DataError(MpmpError):
    """A token file that is missing, unreadable or does not fit the model."""


class CheckpointError(MpmpError):
    """A checkpoint or interchange file that is missing, corrupt or does not fit."""
