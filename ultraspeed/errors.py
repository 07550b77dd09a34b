"""The one exception type users see.

Anything a user can cause (a bad path, an unknown architecture, a prompt that does not fit) raises
`UltraSpeedError` with a message that says what went wrong and what to do; the CLI prints it as one line
and exits non-zero instead of showing a traceback.
"""


class UltraSpeedError(Exception):
    """A user-facing error: its message is complete and printed as is."""
