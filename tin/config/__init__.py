"""Config: the schema (fields, their defaults, help and choices; saved configs), its checks, the command line and YAML."""
