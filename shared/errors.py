"""The exceptions a user can cause, each carrying the exit code the command line ends with (README, "Exit codes").

The command line prints the message as one line on stderr and exits with ``exit_code``; scripts branch on the code.
"""

USAGE = 2
REFUSED = 3
UNREACHABLE = 4
REVOKED = 5
INTERRUPTED = 130


class DumeError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line. Bad usage or input."""

    exit_code = USAGE


class CoordinatorRefused(DumeError):
    """The coordinator answered and declined the request (not found, invalid, not allowed in its current state)."""

    exit_code = REFUSED


class CoordinatorUnreachable(DumeError):
    """No answer from the coordinator: it is not running, not reachable, or did not reply in time."""

    exit_code = UNREACHABLE


class IdentityRefused(DumeError):
    """The coordinator refuses this identity: the node was revoked or has left, or its certificate is void."""

    exit_code = REVOKED
