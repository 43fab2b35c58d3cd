"""README.md's set-up commands are the ones CI runs, and the first runs on files the repository
ships."""
import re

from conftest import ROOT


def readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(pip install .*)\n```", readme)


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]
    assert "extract_feats.py" in commands[0] and "pytest" in commands[1]
    assert "-r tests/requirements.txt" in commands[1]


def test_first_command_runs_on_the_shipped_examples():
    first = readme_commands()[0]
    folder = ROOT / re.search(r" -i (\S+)", first).group(1)
    extensions = re.search(r" -f ((?:\.\w+ ?)+)", first).group(1).split()
    assert folder.is_dir() and folder.is_relative_to(ROOT)
    assert sorted({p.suffix for p in folder.iterdir() if p.suffix != ".md"}) == sorted(extensions)
    assert "--topk" in first
