"""The README's commands and config must stay true."""

import re
from pathlib import Path

import yaml

from fusellm.config import parse_fusion_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_fusion_config_parses():
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    config = parse_fusion_config(yaml.safe_load(block), source="README.md")
    assert [s.name for s in config.sources] == ["openllama", "mpt"]
    assert config.sources[1].trust_remote_code and not config.sources[0].trust_remote_code
    assert config.training.lam == 0.9
