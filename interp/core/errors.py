"""The one exception type for user mistakes: the CLI prints its message on one line, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (a path, a flag, a record); the message says what is wrong and what to do."""
