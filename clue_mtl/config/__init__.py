"""Run configs: the schema and its checks (`run_config`), per-task structure (`structure`)."""
