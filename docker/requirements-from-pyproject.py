"""Print the runtime dependencies of pyproject.toml, one per line (for image builds).

Images install these in a layer of their own, before the source is copied, so that a change
to the code does not reinstall every dependency.
"""

import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as handle:
    project = tomllib.load(handle)["project"]
print("\n".join(project["dependencies"]))
