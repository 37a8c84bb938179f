"""The one exception for mistakes a user can fix; CLIs print it as a single line, no traceback."""


class UserError(Exception):
    """Bad input or configuration: the message names the file/rank/option and what to do."""
