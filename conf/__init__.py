"""Package marker: pyproject.toml maps conf/ to trainrun.conf, and editable installs find it only with this file."""
