"""Configuration: defaults < config file (TOML) < environment < command-line flags.

    # /etc/cgprocfs/config.toml
    mountpoint = "/var/lib/cgprocfs"
    views = "all"              # or a list: ["proc/meminfo", "proc/stat", ...]
    hide_swap = false
    cpu_quota = true           # count CPUs from CFS quotas, not only cpusets
    log_level = "info"
    limits_max_age = 1.0       # seconds a cgroup's limits may be served from memory
    host_max_age = 0.05        # seconds the host's meminfo may be old when used as a cap
    kept_files = 2048          # files each worker keeps open to re-read (0: none)
    sysinfo_socket = "/run/cgprocfs/seccomp.sock"  # where the sysinfo agent takes listeners
    io_uring = false           # serve through FUSE over io_uring (docs/operation.md)

Environment: CGPROCFS_CONFIG (the file), CGPROCFS_MOUNTPOINT, CGPROCFS_VIEWS (comma list or
"all"), CGPROCFS_HIDE_SWAP, CGPROCFS_CPU_QUOTA (1/0, true/false), CGPROCFS_LOG_LEVEL,
CGPROCFS_LIMITS_MAX_AGE, CGPROCFS_HOST_MAX_AGE, CGPROCFS_KEPT_FILES, CGPROCFS_SYSINFO_SOCKET,
CGPROCFS_IO_URING.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from cgprocfs.kept import MAX_FILES, MAX_FILES_SETTING

DEFAULT_CONFIG_PATH = "/etc/cgprocfs/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


@dataclass(frozen=True)
class Config:
    mountpoint: str = "/var/lib/cgprocfs"
    views: tuple[str, ...] | None = None  # None: every view the host supports
    hide_swap: bool = False
    cpu_quota: bool = True
    log_level: str = "info"
    limits_max_age: float = 1.0
    host_max_age: float = 0.05
    kept_files: int = MAX_FILES
    sysinfo_socket: str = "/run/cgprocfs/seccomp.sock"
    io_uring: bool = False

    def check(self, known_views: tuple[str, ...]) -> None:
        if not os.path.isabs(self.mountpoint):
            raise ConfigError(f"mountpoint must be an absolute path, not {self.mountpoint!r}")
        if not os.path.isabs(self.sysinfo_socket):
            raise ConfigError("sysinfo_socket must be an absolute path, "
                              f"not {self.sysinfo_socket!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, "
                              f"not {self.log_level!r}")
        for name in ("limits_max_age", "host_max_age"):
            value = getattr(self, name)
            if not 0 <= value <= 60:
                raise ConfigError(f"{name} must be between 0 and 60 seconds, not {value}")
        if not 0 <= self.kept_files <= MAX_FILES_SETTING:
            raise ConfigError(f"kept_files must be between 0 and {MAX_FILES_SETTING}, "
                              f"not {self.kept_files}")
        if self.views is not None:
            unknown = [v for v in self.views if v not in known_views]
            if unknown:
                raise ConfigError(f"unknown views {unknown}; known: {', '.join(known_views)}")
            if not self.views:
                raise ConfigError("views is empty: serve at least one")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from exc


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool | float):
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from exc


def _views(value: Any) -> tuple[str, ...] | None:
    if value == "all":
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'views must be "all" or a list of paths, not {value!r}')
    return tuple(v.lstrip("/") for v in value)


def _coerce(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(Config)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown setting {key!r} "
                              f"(known: {', '.join(sorted(known))})")
        if key in ("hide_swap", "cpu_quota", "io_uring"):
            out[key] = _bool(key, value)
        elif key in ("limits_max_age", "host_max_age"):
            out[key] = _float(key, value)
        elif key == "kept_files":
            out[key] = _int(key, value)
        elif key == "views":
            out[key] = _views(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, not {value!r}")
        else:
            out[key] = value
    return out


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> Config:
    """The effective configuration. A missing default config file is fine; a missing file
    named explicitly (argument or CGPROCFS_CONFIG) is an error."""
    env = os.environ if env is None else env
    explicit = path or env.get("CGPROCFS_CONFIG")
    file_path = explicit or DEFAULT_CONFIG_PATH
    cfg = Config()
    try:
        with open(file_path, "rb") as f:
            data = tomllib.load(f)
        cfg = replace(cfg, **_coerce(data, file_path))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {file_path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file_path}: not valid TOML: {exc}") from exc
    from_env = {f.name: env[f"CGPROCFS_{f.name.upper()}"] for f in fields(Config)
                if f"CGPROCFS_{f.name.upper()}" in env}
    cfg = replace(cfg, **_coerce(from_env, "environment"))
    if overrides:
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return cfg


def to_toml(cfg: Config) -> str:
    lines = []
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.name == "views":
            text = '"all"' if value is None else "[" + ", ".join(f'"{v}"' for v in value) + "]"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f'"{value}"'
        else:
            text = repr(value)
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"
