"""README, docs, CI and configs agree."""

from __future__ import annotations

import re

from conftest import REPO


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    run_command, test_command = _quick_start_commands()
    assert run_command.endswith("python -m prospect.run")
    assert test_command.endswith("python -m pytest")
    ci_lines = (REPO / ".ci/run").read_text().splitlines()
    assert test_command in ci_lines


def test_top_level_layout():
    for name in ("pyproject.toml", "conf", "prospect", "tests", "multirun", "notebooks", "README.md", ".ci/run"):
        assert (REPO / name).exists(), name


def test_every_strategy_has_a_config_file_and_a_docs_row():
    from prospect.context_strategies import STRATEGIES

    text = (REPO / "docs" / "strategies.md").read_text()
    for name in STRATEGIES:
        assert (REPO / "conf" / "strategy" / f"{name}.yaml").is_file(), name
        assert f"| `{name}` |" in text, name
