"""Placeholder: branch `jobref` replaces this file with the hook that fills
docs/reference/job-file.md from pipeline.config's dataclasses and defaults (issue #27)."""
