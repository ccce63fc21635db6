"""Experiment configs (`get_config(arg) -> ConfigDict`), passed by path with `--config`.

Not installed with the package: the building blocks they share live in
`alignment_gap/presets/`, so a config file works from any checkout or copy.
"""
