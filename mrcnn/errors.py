"""The base class of the errors a user can fix (bad data, configuration, weights files, ...).

Every such error subclasses MrcnnError (and the built-in exception it always was: ValueError,
IOError, ...), so a command-line front end prints `str(error)` for any MrcnnError and shows a
traceback for anything else, without knowing which module raised it. Each class may carry a
`hint`: one more line telling what to do, printed by such a front end after the message.
"""


class MrcnnError(Exception):
    """An error in what the user gave (a file, a row, a setting); the message says which."""

    hint = None
