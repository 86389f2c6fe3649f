"""The one exception type that means "the user gave us something wrong".

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, an invalid option, a corrupt checkpoint.

    The message is one line that says what is wrong and with which file or value.
    """

    exit_code = 2
