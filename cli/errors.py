"""The error every command may raise for a mistake the user can fix (its own module, so that the
command modules and commands.py, which dispatches to them, need not import each other)."""


class UserError(Exception):
    """Ends the command with `raymoe: <message>` and exit status 2."""
