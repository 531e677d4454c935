"""The one error kind for bad user input (a name, a value, a file, a line in a file).

Its message names what is wrong and where; the command line prints it as one line and exits 2,
without a traceback. Subclasses: ``config.ConfigError`` (configuration keys) and
``data.DatasetFormatError`` (dataset files).
"""


class InputError(ValueError):
    """Bad input from the user; the message names the key, flag, file or line."""
