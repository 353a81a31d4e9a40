"""Each module here registers CLI commands with :func:`alignkit.cli.register_command`.

Adding a command is one new file: no list elsewhere to edit.
"""
