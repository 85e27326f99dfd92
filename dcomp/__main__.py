import os
import sys

# `python -m dcomp` puts the current folder first on sys.path, which would let any file there
# shadow a module dcomp imports later. Behave like the `dcomp` script instead: the current
# folder is searched only for a module the user types (--arch mynet:Net, dcomp.models.arch).
if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.pop(0)

from dcomp.cli.app import main  # noqa: E402

if __name__ == "__main__":
    main()
