"""Collect bench_*.py files when pytest is pointed at the bench/ directory
(``python -m pytest bench --benchmark-only``); the default python_files pattern only
matches test_*.py. Files named explicitly on the command line are collected by pytest
itself, so they are skipped here to avoid duplicates."""
import pytest


def pytest_collect_file(file_path, parent):
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
