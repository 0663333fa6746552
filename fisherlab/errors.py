"""Exceptions shared across fisherlab.

The CLI turns a :class:`UserInputError` (and its subclasses) into one line on stderr and
exit status 2; the API raises them as precise exceptions.
"""


class UserInputError(ValueError):
    """Bad input from a user: an unknown name, a missing file, an invalid setting."""


class StoreFormatError(UserInputError):
    """A file that is not a fisherlab run file, or one of an unsupported version."""


class DataNotFoundError(UserInputError):
    """A benchmark data set could not be found; the message says what to put where."""
