"""`alignkit env`: versions, devices, cache paths and extras, for bug reports."""

from alignkit.cli import Command, register_command

register_command(Command("env", "alignkit.env:EnvConfig", "alignkit.env:run_env",
                         "Print versions, devices, cache paths and installed extras (paste it into a bug report).",
                         {"json": "as_json"}))
