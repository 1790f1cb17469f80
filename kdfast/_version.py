# The one place the version is written. pyproject.toml reads it (setuptools evaluates this file
# statically, without importing kdfast or torch), setup.py passes it to the C++ build as
# KDFAST_VERSION, and kdfast.__version__ and build_info() import it. Keep it a plain string literal.
__version__ = "0.1.0"
