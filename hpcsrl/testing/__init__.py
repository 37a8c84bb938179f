"""Test infrastructure that ships with the package (real daemons for integration tests)."""
