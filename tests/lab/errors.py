"""The lab's one exception type."""


class LabError(RuntimeError):
    """The lab could not do what was asked; the message says what and where to look."""
