"""Small CLI command modules (loaded lazily by peftdeploy.cli)."""
