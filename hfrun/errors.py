"""The one exception type that reaches the user as a message instead of a traceback."""


class HfrunError(Exception):
    """A problem the user can fix: bad config, missing data, unusable checkpoint.

    The message says what was wrong and what to do; the CLI prints it as one
    paragraph and exits with status 1.
    """
