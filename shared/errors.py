"""The one exception type a user can cause; the command line prints its message as one line and exits 2."""


class DumeError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line."""
