"""The workspace configuration file, ``config.toml``: read, validated, written atomically.

Validation is table-driven (:data:`SCHEMA`): every section and key is declared with its
type, unknown keys are refused (a typo must not silently fall back to a default), and
each error names the file, the key and the fix. Other parts of insitu add their
sections here as they grow.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from insitu._atomic import atomic_write_text
from insitu.errors import ConfigError

__all__ = ["SCHEMA", "Config", "load_config", "save_config"]

#: section -> key -> (type, default). ``None`` default: required.
SCHEMA: dict[str, dict[str, tuple[type, Any]]] = {
    "node": {
        "id": (str, None),
        "name": (str, None),
        "created": (str, None),
    },
    "ledger": {
        "head_interval": (int, 256),
    },
    "server": {
        "host": (str, "127.0.0.1"),
        "port": (int, 8765),
    },
    # Where the node's signing key lives: "" for keys/signing.key, or an RFC 7512
    # PKCS#11 URI of a key in a token (insitu init --key-uri) and the token's library.
    "keys": {
        "signing": (str, ""),
        "pkcs11_module": (str, ""),
        # The bundle decryption key: "" for keys/encryption.key (X25519), or the URI
        # of a P-256 key agreement key in the token (made beside the signing key).
        "decryption": (str, ""),
    },
    # The site's privacy budget, per data set, across every training on it.
    "privacy": {
        "epsilon_budget": (float, 10.0),
        "delta": (float, 1e-5),
    },
    # Drift monitoring (insitu.drift): when a feature is flagged.
    "drift": {
        "psi_threshold": (float, 0.2),
        "p_value": (float, 0.01),
        "min_samples": (int, 500),
        "check_every": (int, 1000),
    },
}

_HEADER = (
    "# insitu workspace configuration. Keys are documented in docs/configuration.md.\n"
    "# node.id is derived from the signing key: changing it here does not change it.\n\n"
)


@dataclass
class Config:
    """A validated configuration: ``sections[section][key]``."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Any:
        """A value, or its schema default."""
        value = self.sections.get(section, {}).get(key)
        return SCHEMA[section][key][1] if value is None else value


def _validate(doc: dict[str, Any], path: Path) -> Config:
    sections: dict[str, dict[str, Any]] = {}
    for section, values in doc.items():
        if section not in SCHEMA:
            known = ", ".join(sorted(SCHEMA))
            raise ConfigError(f"{path}: unknown section [{section}]; known sections: {known}")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be a table ([{section}])")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                known = ", ".join(sorted(SCHEMA[section]))
                raise ConfigError(f"{path}: unknown key {section}.{key}; known keys: {known}")
            expected = SCHEMA[section][key][0]
            accepted = (int, float) if expected is float else expected
            # bool is an int in Python; a config value of true for a port is a mistake.
            if not isinstance(value, accepted) or isinstance(value, bool):
                raise ConfigError(
                    f"{path}: {section}.{key} must be a {expected.__name__}, "
                    f"not {type(value).__name__} ({value!r})"
                )
        sections[section] = dict(values)
    for section, keys in SCHEMA.items():
        for key, (_, default) in keys.items():
            if default is None and key not in sections.get(section, {}):
                raise ConfigError(
                    f"{path}: required key {section}.{key} is missing; restore the file "
                    "from a backup or re-create the workspace"
                )
    if sections.get("ledger", {}).get("head_interval", 1) < 1:
        raise ConfigError(f"{path}: ledger.head_interval must be at least 1")
    privacy = sections.get("privacy", {})
    if privacy.get("epsilon_budget", 1.0) <= 0:
        raise ConfigError(f"{path}: privacy.epsilon_budget must be positive")
    if not 0 < privacy.get("delta", 1e-5) < 1:
        raise ConfigError(f"{path}: privacy.delta must be between 0 and 1")
    _check_drift(sections.get("drift", {}), path)
    return Config(sections)


def _check_drift(drift: dict[str, Any], path: Path) -> None:
    if not 0 < drift.get("psi_threshold", 0.2) <= 10:
        raise ConfigError(
            f"{path}: drift.psi_threshold must be in (0, 10] (0.2 is a significant shift)"
        )
    if not 0 < drift.get("p_value", 0.01) < 1:
        raise ConfigError(f"{path}: drift.p_value must be between 0 and 1 (e.g. 0.01)")
    if drift.get("min_samples", 1) < 1 or drift.get("check_every", 1) < 1:
        raise ConfigError(f"{path}: drift.min_samples and drift.check_every must be at least 1")


def load_config(path: Path) -> Config:
    """Read and validate ``config.toml``.

    Raises:
        ConfigError: the file is missing, not TOML, or not valid.

    """
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: the workspace is incomplete; run 'insitu init' to repair it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix the file or restore it") from exc
    return _validate(doc, path)


def save_config(path: Path, config: Config) -> None:
    """Write ``config`` atomically (validated first)."""
    _validate(config.sections, path)
    atomic_write_text(path, _HEADER + tomli_w.dumps(config.sections))
