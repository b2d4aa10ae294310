"""The spec language: its JSON Schema and example specs (package data)."""
