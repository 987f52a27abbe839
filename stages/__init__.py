"""DVC stages as Typer commands: parse options and params, call the library, write outputs."""
