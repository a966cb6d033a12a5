"""insitu: private AI where the data lives.

Federated training with differential privacy, signed and encrypted model bundles for
the edge, local inference, and a verifiable audit ledger. See the README for the CLI;
the Python API starts at :class:`insitu.workspace.Workspace` and
:class:`insitu.audit.Ledger`, trains with :func:`insitu.federated.simulate` and runs
models with :class:`insitu.runtime.ModelRuntime`. The examples in the README and
``docs/`` are run by the tests (``tests/test_docs_examples.py``).
"""

from __future__ import annotations

# Before anything else: dependencies with telemetry read their opt-out variables at
# import time, and this import must come first in the package.
from insitu import _privacy_env

_privacy_env.apply()

from insitu.errors import InsituError  # noqa: E402

__all__ = ["InsituError", "__version__"]

__version__ = "0.1.0"
