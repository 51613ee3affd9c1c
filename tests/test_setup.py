"""The README's test command and .ci/run must stay the same command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md must open with a fenced block holding the two set-up commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "balcap_jax.train" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_eight_fake_devices():
    import jax

    assert jax.device_count() == 8


def test_both_commands_install_from_the_lock():
    """constraints.txt pins every package the suite passed with; both README commands install through it."""
    commands = _readme_commands()
    assert all("-c constraints.txt" in c for c in commands), commands
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s=]+", pin) for pin in pins), pins[:5]
    assert {pin.split("==")[0].lower() for pin in pins} >= {"jax", "jaxlib", "flax", "torch", "transformers", "trl"}
