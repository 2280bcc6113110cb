"""The one exception type a user should see as a message, not a traceback."""


class TitansError(Exception):
    """A problem with the user's input (config, checkpoint, data): the CLI prints the message on one
    line and exits with status 1."""
