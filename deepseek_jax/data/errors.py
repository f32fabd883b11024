"""The one exception type of the data package."""


class DataError(ValueError):
    """A data source, tokenizer or pipeline setting is unusable; the message names the problem and the fix."""
