"""Print the project's requirements (its dependencies and those of the extras named on the
command line) from pyproject.toml, one per line: images install them in a layer of their own,
before the sources, so that a change of code does not reinstall them.

    python3 docker/requirements.py pyproject.toml train eval orchestration
"""

import sys

import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = project.get("optional-dependencies", {})
unknown = sorted(set(sys.argv[2:]) - set(extras))
if unknown:
    sys.exit(f"{sys.argv[1]}: no extra named {', '.join(unknown)}")
print("\n".join(project["dependencies"] + [r for name in sys.argv[2:] for r in extras[name]]))
