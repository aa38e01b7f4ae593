"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a path, a dataset, a checkpoint).

    The message is one line: what was found, what was expected, and how to fix it.
    `distill.train.main` prints it as `error: <message>` and returns exit code 2; nothing may
    have been written to the output folder before it is raised.
    """
