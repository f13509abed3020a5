"""Test doubles. Nothing here is a real backend; see each module's docstring."""
