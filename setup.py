"""Only what pyproject.toml cannot say: conf/ ships inside the wheel as the package data `pipeline/conf`, so an
installed medprune (not a checkout) composes its configs too (pipeline/paths.py CONF_DIR), while the checkout
keeps its top-level conf/."""
from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[*find_packages(include=["pipeline*", "data*", "models*"]), "pipeline.conf",
              *find_namespace_packages(include=["hydra_plugins.*"])],  # the search sweeper (Hydra finds plugins there)
    package_dir={"pipeline.conf": "conf"},
    package_data={"pipeline.conf": ["*.yaml", "**/*.yaml"]},
)
