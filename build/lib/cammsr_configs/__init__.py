"""The YAML configs, installed as the package cammsr_configs (pyproject.toml) so that commands find them."""
