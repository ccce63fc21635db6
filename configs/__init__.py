"""Config files (`get_config(arg) -> ConfigDict`); importable so that files can share presets."""
