"""freshrec: a streaming, real-time recommender on Kafka, Faust and Redis.

The rooms by role (each a folder at the repository root, installed as ``freshrec.<room>``):
``models`` (pure online learners), ``store`` (the Redis contract), ``streams`` (Kafka and
Faust), ``serving`` (the reader), ``evaluation``, ``bench`` and ``devenv`` (tools).
"""

import os
import sys


def _kernel_cache() -> None:
    """Points numba's cache at ``FRESHREC_HOME/numba`` unless ``NUMBA_CACHE_DIR`` is set.

    numba's default is a ``__pycache__`` beside each source file, which a read-only install
    (a system package, a container image) cannot write: every process would then compile the
    kernels again, or fail. numba reads the variable when it is imported and fixes a
    function's cache folder when the module defining it is imported, so this runs before any
    room is, from the package every room is imported through; child processes inherit it.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    from freshrec.settings import Settings

    # Only FRESHREC_HOME: a malformed other setting is for the command that reads it to report.
    home = Settings.env_name("home")
    folder = Settings.from_env({home: os.environ.get(home, "")}).kernel_cache_dir
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    if "numba" in sys.modules:  # imported before freshrec: have it read the variable again
        from numba.core import config

        config.reload_config()


_kernel_cache()
