"""The daemon's configuration: defaults < YAML file < ``TIDEGATE_*`` environment < flags.

``load_config`` is pure: it reads the file and the mappings it is given, starts nothing
and opens no socket, so ``tidegate serve`` can reject a bad setting before its first side
effect. A bad setting is a ``ConfigError`` naming the key (``cluster.local.workers``) or
the variable (``TIDEGATE_DRAIN_TIMEOUT_S``), what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from tidegate.knobs import DEPRECATED_ENV, PIN_ENV, ControllerKnobs, Float, Int, standard_bounds
from tidegate.validation import (
    ErrorTranslator,
    FieldError,
    ValidationFailed,
    YamlLimits,
    base_types,
    dotted,
    invalid,
    read_yaml_file,
    show,
)

if TYPE_CHECKING:
    from tidegate.spec import SpecLimits

ENV_PREFIX = "TIDEGATE_"
ENV_NESTING = "__"  # TIDEGATE_CLUSTER__LOCAL__WORKERS -> cluster.local.workers
# TIDEGATE_ variables that other parts of tidegate read (the client, `tidegate run`); the
# daemon leaves them alone. Any other unknown TIDEGATE_ variable is a typo and an error.
FOREIGN_ENV_VARS = frozenset(
    {"TIDEGATE_URL", "TIDEGATE_TOKEN", "TIDEGATE_LOG_LEVEL", *PIN_ENV, *DEPRECATED_ENV}
)
MODULE_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
LISTEN_TEXT = "host:port, e.g. 127.0.0.1:8790 or [::1]:8790"
ADDRESS_TEXT = (
    "a scheduler address scheme://host:port, e.g. tcp://10.0.0.5:8786 "
    "(empty for an embedded LocalCluster)"
)


class ConfigError(ValidationFailed):
    """The daemon configuration is not valid."""

    default_source = "daemon config"


# --- field types ---------------------------------------------------------------------------
# Numbers follow the knobs' policy (tidegate.knobs.Int and Float): `workers: true` or `2.5`
# is an error, not 1 or 2, but a number may arrive as text, as every variable does.


def _non_empty_path(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise invalid("", "a non-empty path", repr(value))  # Path("") would mean "."
    return value


def _absolute(path: Path) -> Path:
    """Relative to the current directory; a file's relative paths are resolved against its
    directory before they get here. Symlinks are kept as written."""
    return Path(os.path.abspath(path))


def _none_is_empty(value: Any) -> Any:
    # `cluster:` with every key below it commented out is YAML null.
    return {} if value is None else value


AbsPath = Annotated[Path, BeforeValidator(_non_empty_path), AfterValidator(_absolute)]
ModulePrefix = Annotated[str, StringConstraints(pattern=MODULE_PATTERN)]
_Model = TypeVar("_Model", bound=BaseModel)


def _defaults(model: type[_Model]) -> Callable[[], _Model]:
    """A section's default: nothing set (a lambda calling the model would do, but mypy
    does not see pydantic's positional defaults)."""
    return lambda: model.model_validate({})


def _got(value: Any) -> str:
    """What came; a string's quotes already say it is one (and every env value is)."""
    return show(value, typed=not isinstance(value, str))


def _finite(default: Any = None, **kwargs: Any) -> Any:
    return Field(default, allow_inf_nan=False, **kwargs)


def split_host_port(text: str, *, min_port: int = 0) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError("no port")
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not min_port <= port <= 65535:
        raise ValueError(f"port {port} is not in {min_port}-65535")
    if not host:
        raise ValueError("no host")
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address in brackets") from None
        return inner, port
    if ":" in host:
        raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:8790")
    if re.search(r"[\s/\[\]@]", host):
        raise ValueError(f"{host!r} is not a host name or address")
    return host, port


# --- the models ------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=standard_bounds)


class LocalClusterConfig(_Section):
    """The embedded LocalCluster, used when cluster.address is empty."""

    workers: Int | None = Field(None, ge=1, description="worker processes (one per core)")
    threads_per_worker: Int | None = Field(None, ge=1, description="threads per worker")
    memory_limit: str | None = Field(
        None, description="memory limit per worker, e.g. 2GiB, 500MB or auto"
    )

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # a number of bytes
        if value == "auto":
            return value
        from dask.utils import parse_bytes  # a pure function; nothing of dask starts

        try:
            size = int(parse_bytes(value)) if isinstance(value, str) else -1
        except (ValueError, TypeError):
            size = -1
        if size <= 0:
            raise invalid("", "a size such as 2GiB or 500MB, or auto", _got(value))
        return value


class ClusterTlsConfig(_Section):
    """TLS to a remote scheduler (cluster.address tls://...). The embedded LocalCluster
    always uses mutual TLS with a credential generated at start, and takes none of these."""

    ca_file: AbsPath | None = Field(
        None, description="the CA certificate that signed the scheduler's (PEM)")
    cert: AbsPath | None = Field(None, description="this client's certificate (PEM)")
    key: AbsPath | None = Field(
        None, description="this client's private key (PEM); empty: inside cert")


class ClusterConfig(_Section):
    address: str | None = Field(None, description=ADDRESS_TEXT)
    local: Annotated[LocalClusterConfig, BeforeValidator(_none_is_empty)] = Field(
        default_factory=_defaults(LocalClusterConfig)
    )
    tls: Annotated[ClusterTlsConfig, BeforeValidator(_none_is_empty)] = Field(
        default_factory=_defaults(ClusterTlsConfig)
    )
    no_workers_timeout_s: Float = _finite(
        30.0, gt=0,
        description="seconds without workers before a job pauses (interrupted) and the "
                    "embedded cluster is restarted")

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise invalid("", ADDRESS_TEXT, _got(value))
        text = value.strip()
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://(.+)", text)
        if match is None:
            raise invalid("", ADDRESS_TEXT, f"{text!r} (no scheme://)")
        if match[1] != "inproc":  # inproc://<ip>/<pid>/<n> names a thread, not a port
            try:
                split_host_port(match[2], min_port=1)
            except ValueError as exc:
                raise invalid("", ADDRESS_TEXT, f"{text!r} ({exc})") from None
        return text

    @model_validator(mode="after")
    def _one_cluster(self) -> ClusterConfig:
        given = {k: v for k, v in self.local.model_dump().items() if v is not None}
        if self.address is not None and given:
            raise invalid(
                "local",
                "no local settings when cluster.address is set (they size the embedded "
                "cluster only)",
                ", ".join(f"{k}={v}" for k, v in given.items()),
            )
        tls = {k: v for k, v in self.tls.model_dump().items() if v is not None}
        if self.address is None and tls:
            raise invalid(
                "tls",
                "no tls settings without cluster.address (the embedded cluster generates "
                "its own credential)",
                ", ".join(f"{k}={v}" for k, v in tls.items()),
            )
        return self


class FlushConfig(_Section):
    """A part is written every `params` completed params or every `seconds`."""

    params: Int = Field(1000, ge=1, description="completed params per part")
    seconds: Float = _finite(10.0, gt=0, description="seconds between parts at most")


class SecurityConfig(_Section):
    token_file: AbsPath | None = Field(
        None, description="a file holding the API token (required off loopback)"
    )
    allowed_modules: list[ModulePrefix] = Field(
        default_factory=list,
        description="module prefixes a job's model and targets must be defined in; empty: "
                    "any importable module (subprocess, os: a warning at start)",
    )
    code_roots: list[AbsPath] = Field(
        default_factory=list,
        description="directories a job's code_paths and parameters.file must lie under; "
                    "empty: jobs may name neither",
    )
    max_body_bytes: Int = Field(1_048_576, ge=1024, description="largest HTTP request body")
    # Slow or stalled clients (slowloris): each open connection holds a file descriptor,
    # so without these a few thousand half-sent requests exhaust the daemon's.
    max_connections: Int = Field(
        1000, ge=1, description="open HTTP connections at most; beyond it new ones are closed")
    header_timeout_s: Float = _finite(
        10.0, gt=0, description="seconds a connection may take to send a request's headers, "
                                "and stay idle between requests")
    body_timeout_s: Float = _finite(
        60.0, gt=0, description="seconds a request may take to send its body")

    def token(self) -> str | None:
        """The API token, read now (not at load, so that the file may be rotated)."""
        if self.token_file is None:
            return None
        field, path = "security.token_file", self.token_file
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                [FieldError(field, "a readable file holding the API token", f"'{path}' ({reason})")]
            ) from None
        if not token:
            raise ConfigError(
                [FieldError(field, "a file holding the API token", f"'{path}' (empty)")]
            )
        return token


class LimitsConfig(_Section):
    """How large a submitted job may be, checked before it is expanded (a grid's size from
    its shape). Lower than `tidegate run`'s defaults: the daemon holds every queued job's
    spec and expands the running one in memory."""

    max_params: Int = Field(1_000_000, ge=1, description="parameter sets per job")
    max_replicates: Int = Field(10_000, ge=1, description="replicates per parameter set")
    max_tasks: Int = Field(
        10_000_000, ge=1, description="tasks per job: params x (replicates + targets)"
    )
    max_file_bytes: Int = Field(
        1 << 30, ge=1, description="bytes of a job's params file (parameters.file)"
    )
    yaml_depth: Int = Field(64, ge=8, description="nesting depth of a spec (YAML or JSON)")
    yaml_alias_nodes: Int = Field(
        10_000, ge=0, description="nodes that YAML aliases (*name) of a spec may expand to"
    )
    # A job's code paths are copied into state_dir/code at submission (codepaths.py).
    code_max_files: Int = Field(10_000, ge=1, description="files in a job's code_paths")
    code_max_bytes: Int = Field(
        256 * 2**20, ge=1, description="bytes of the files in a job's code_paths, together"
    )

    def spec_limits(self) -> SpecLimits:
        from tidegate.spec import SpecLimits  # spec imports pyarrow; config stays light

        return SpecLimits(
            max_params=self.max_params,
            max_replicates=self.max_replicates,
            max_tasks=self.max_tasks,
            max_file_bytes=self.max_file_bytes,
            yaml=YamlLimits(max_depth=self.yaml_depth, max_alias_nodes=self.yaml_alias_nodes),
        )


class TokenFile:
    """The API token, re-read when its file changes (inode, size or mtime), so that a
    rotated token takes effect without a restart; one stat() per request."""

    def __init__(self, security: SecurityConfig) -> None:
        self._security = security
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None

    def current(self) -> str | None:
        """The token now; ConfigError when the file is unreadable or empty."""
        path = self._security.token_file
        if path is None:
            return None
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None  # token() below names the file and the reason
        if stamp is None or stamp != self._stamp:
            self._token = self._security.token()
            self._stamp = stamp
        return self._token


class LogConfig(_Section):
    format: Literal["text", "json"] = Field("text", description="one line of text or JSON")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


# A sub-section: absent or null in the file is its defaults.
Sub = Annotated[_Model, BeforeValidator(_none_is_empty)]


def _sub(model: type[_Model]) -> Any:
    return Field(default_factory=_defaults(model))


class DaemonConfig(_Section):
    """Everything `tidegate serve` needs, validated before anything starts."""

    listen: str = Field("127.0.0.1:8790", description=LISTEN_TEXT)
    state_dir: AbsPath = Field(Path("/var/lib/tidegate"), description="the SQLite job queue")
    output_root: AbsPath = Field(
        Path("/var/lib/tidegate/outputs"), description="where job outputs go"
    )
    cluster: Sub[ClusterConfig] = _sub(ClusterConfig)
    controller: Sub[ControllerKnobs] = _sub(ControllerKnobs)
    flush: Sub[FlushConfig] = _sub(FlushConfig)
    drain_timeout_s: Float = _finite(
        30.0, ge=0, description="seconds a stop waits for in-flight params to be written"
    )
    security: Sub[SecurityConfig] = _sub(SecurityConfig)
    limits: Sub[LimitsConfig] = _sub(LimitsConfig)
    log: Sub[LogConfig] = _sub(LogConfig)

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise invalid("", LISTEN_TEXT, _got(value))
        try:
            split_host_port(value.strip())
        except ValueError as exc:
            raise invalid("", LISTEN_TEXT, f"{value!r} ({exc})") from None
        return value.strip()

    # A non-loopback listen without a token is refused by the service at start-up
    # (exit 3, a start-up failure), not here: the config itself is well-formed.

    @property
    def host(self) -> str:
        """The address to bind, IPv6 without brackets."""
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    def is_loopback(self) -> bool:
        """Whether only this machine can connect (no DNS lookup: names other than
        localhost count as reachable from outside)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def config_json_schema() -> dict[str, Any]:
    return DaemonConfig.model_json_schema()


# --- the keys ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """A leaf of the config: its dotted name and how text for it is read."""

    dotted: str  # cluster.local.workers
    kind: Literal["scalar", "list", "path", "paths"]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dotted.upper().replace(".", ENV_NESTING)


def _walk(
    model: type[BaseModel], at: tuple[str, ...] = ()
) -> tuple[dict[tuple[str, ...], type[BaseModel]], list[ConfigKey]]:
    """The model at each location and every leaf key below ``model``."""
    models: dict[tuple[str, ...], type[BaseModel]] = {at: model}
    keys: list[ConfigKey] = []
    for name, info in model.model_fields.items():
        here = (*at, name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            sub_models, sub_keys = _walk(info.annotation, here)
            models.update(sub_models)
            keys += sub_keys
        else:
            keys.append(ConfigKey(".".join(here), _kind(info.annotation)))
    return models, keys


def _kind(annotation: Any) -> Literal["scalar", "list", "path", "paths"]:
    if typing.get_origin(annotation) is list:
        return "paths" if Path in base_types(typing.get_args(annotation)[0]) else "list"
    return "path" if Path in base_types(annotation) else "scalar"


_MODELS, _KEYS = _walk(DaemonConfig)
KEYS: dict[str, ConfigKey] = {k.dotted: k for k in _KEYS}
ENV_VARS: dict[str, ConfigKey] = {k.env: k for k in _KEYS}
_TRANSLATE = ErrorTranslator(
    _MODELS, {MODULE_PATTERN: "a module name or prefix such as 'sir' or 'mypkg.models'"}
)
# Every environment value is a string: "'soon'" says enough, "'soon' (str)" is noise.
_TRANSLATE_TEXT = dataclasses.replace(_TRANSLATE, typed=False)


# --- loading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Origin:
    source: str  # the file's path, "environment" or "command line"
    variable: str | None = None  # the environment variable errors name instead of the key


@dataclasses.dataclass
class _Layers:
    """The settings merged so far, and where each key came from."""

    data: dict[Any, Any] = dataclasses.field(default_factory=dict)
    origins: dict[str, _Origin] = dataclasses.field(default_factory=dict)
    sources: list[str] = dataclasses.field(default_factory=list)

    def add(self, path: tuple[Any, ...], value: Any, origin: _Origin) -> None:
        *parents, last = path
        node = self.data
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                return  # `cluster: 5` in the file: validation reports it there
            self.origins.setdefault(dotted(parents[: i + 1]), _Origin(origin.source))
            node = child
        node[last] = value
        self.origins[dotted(path)] = origin
        if origin.source not in self.sources:
            self.sources.append(origin.source)

    def origin_of(self, field: str) -> tuple[str, _Origin] | None:
        """The key that set ``field`` (it or the nearest key containing it), and where
        that key came from."""
        while field not in self.origins:
            cut = max(field.rfind("."), field.rfind("["))
            if cut <= 0:
                return None
            field = field[:cut]
        return field, self.origins[field]


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Defaults < the YAML file at ``path`` < ``TIDEGATE_*`` in ``env`` (default
    os.environ) < ``overrides`` ({"cluster.local.workers": 2, ...}; None values ignored).
    A file's relative paths are relative to its directory; other relative paths to the
    current directory. Reads the file and nothing else."""
    layers = _Layers()
    if path is not None:
        _add_file(layers, Path(path))
    _add_env(layers, os.environ if env is None else env)
    _add_overrides(layers, overrides or {})
    try:
        return DaemonConfig.model_validate(layers.data)
    except ValidationError as exc:
        raise _config_error(exc, layers) from None


def _add_file(layers: _Layers, path: Path) -> None:
    source = str(path)
    data = read_yaml_file(path, ConfigError)
    if data is None:  # an empty file, or every line commented out: the defaults
        return
    if not isinstance(data, dict):
        raise ConfigError(
            [FieldError("<top level>", "a mapping of config keys", show(data, typed=True))],
            source,
        )
    base = path.resolve().parent
    origin = _Origin(source)
    for key_path, value in _flatten(data):
        key = KEYS.get(dotted(key_path))
        layers.add(key_path, _from_dir(value, key.kind, base) if key else value, origin)


def _flatten(
    data: Mapping[Any, Any], at: tuple[Any, ...] = ()
) -> list[tuple[tuple[Any, ...], Any]]:
    """{"cluster": {"local": {"workers": 2}}} -> [(("cluster", "local", "workers"), 2)]; a
    mapping where a leaf belongs stays whole, for validation to report."""
    out: list[tuple[tuple[Any, ...], Any]] = []
    for key, value in data.items():
        here = (*at, key)
        if isinstance(value, dict) and value and dotted(here) not in KEYS:
            out += _flatten(value, here)
        else:
            out.append((here, value))
    return out


def _from_dir(value: Any, kind: str, base: Path) -> Any:
    def resolve(item: Any) -> Any:
        if isinstance(item, str) and item.strip():
            return str(base / item)  # an absolute item stays itself
        return item

    if kind == "path":
        return resolve(value)
    if kind == "paths" and isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def _add_env(layers: _Layers, env: Mapping[str, str]) -> None:
    unknown = sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX) and name not in ENV_VARS and name not in FOREIGN_ENV_VARS
    )
    if unknown:
        raise ConfigError([_unknown_variable(name) for name in unknown], "environment")
    for name, key in ENV_VARS.items():
        if name in env:
            origin = _Origin("environment", name)
            layers.add(tuple(key.dotted.split(".")), _from_text(env[name], key.kind), origin)


def _unknown_variable(name: str) -> FieldError:
    got = "an unknown variable"
    # Compared without the prefix they all share, which would make anything look close.
    suffixes = {v.removeprefix(ENV_PREFIX): v for v in ENV_VARS}
    close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), list(suffixes), n=1)
    if close:
        got += f" (did you mean {suffixes[close[0]]}?)"
    return FieldError(
        name,
        "a config key as TIDEGATE_<KEY>, '__' between levels, e.g. TIDEGATE_CLUSTER__ADDRESS",
        got,
    )


def _from_text(value: Any, kind: str) -> Any:
    """A comma-separated list for the list keys; anything else as it came."""
    if kind in ("list", "paths") and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _add_overrides(layers: _Layers, overrides: Mapping[str, Any]) -> None:
    unknown = [k for k in overrides if k not in KEYS]
    if unknown:
        known = ", ".join(KEYS)
        raise ConfigError(
            [FieldError(k, f"a config key ({known})", "an unknown key") for k in unknown],
            "command line",
        )
    origin = _Origin("command line")
    for key, value in overrides.items():
        if value is not None:
            layers.add(tuple(key.split(".")), _from_text(value, KEYS[key].kind), origin)


def _config_error(exc: ValidationError, layers: _Layers) -> ConfigError:
    errors: list[FieldError] = []
    sources: list[str] = []
    for error in exc.errors(include_url=False):
        field_error = _TRANSLATE.field_error(error)
        found = layers.origin_of(field_error.field)
        if found is not None:
            key, origin = found
            if origin.variable is not None:  # name what the user set: the variable
                text = _TRANSLATE_TEXT.field_error(error)
                field_error = dataclasses.replace(
                    text, field=origin.variable + text.field[len(key) :]
                )
            if origin.source not in sources:
                sources.append(origin.source)
        errors.append(field_error)
    # An error no setting caused (no token file for a public listen address) is blamed
    # on every source there was.
    return ConfigError(errors, " + ".join(sources or layers.sources) or None)
