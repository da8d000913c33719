"""kncore's user-facing error, in a module that imports nothing (so that the
command line can refuse bad arguments without importing torch)."""


class InputError(ValueError):
    """Bad user input (a prompt, target, subject, argument...). The message names it."""
