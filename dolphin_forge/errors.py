"""The one exception type for user mistakes.

A `ForgeError` carries a message that is already fit for the user: one line naming the file, line or config
key and what was expected. The CLI prints it without a traceback; anything else is a bug and keeps its traceback.
"""


class ForgeError(Exception):
    """A user mistake (bad config, missing file, unsupported hardware), reported in one line."""
