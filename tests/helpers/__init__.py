"""Test helpers shared by test files (import as ``from helpers.run_if import RunIf``)."""
