"""The daemon config: layers and their precedence, paths, and errors that name the key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidegate.config import (
    FOREIGN_ENV_VARS,
    ConfigError,
    ControllerKnobs,
    DaemonConfig,
    config_json_schema,
    load_config,
)
from tidegate.controller import ControllerConfig
from tidegate.spec import SpecError
from tidegate.validation import FieldError, ValidationFailed

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "tidegate.yaml"


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "tidegate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def config_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    assert info.value.errors, "a ConfigError must carry at least one FieldError"
    return info.value


# --- loading ------------------------------------------------------------------------------


def test_defaults_load_without_file_or_environment() -> None:
    """With no file, no variables and no flags, every key has its documented default."""
    config = load_config(env={})
    assert config == DaemonConfig()
    assert (config.host, config.port, config.is_loopback()) == ("127.0.0.1", 8790, True)
    assert config.state_dir == Path("/var/lib/tidegate")
    assert config.output_root == Path("/var/lib/tidegate/outputs")
    assert config.cluster.address is None
    assert config.controller.overrides() == {}
    assert (config.flush.params, config.flush.seconds) == (1000, 10.0)
    assert config.drain_timeout_s == 30.0
    assert config.security.token() is None
    assert config.security.allowed_modules == [] and config.security.code_roots == []
    assert config.security.max_body_bytes == 1_048_576
    assert (config.log.format, config.log.level) == ("text", "INFO")


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an env argument the process environment is read."""
    monkeypatch.setenv("TIDEGATE_DRAIN_TIMEOUT_S", "7")
    assert load_config().drain_timeout_s == 7.0


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    """defaults < file < environment < overrides, key by key; None overrides are ignored."""
    path = write(
        tmp_path,
        {
            "listen": "127.0.0.1:9000",
            "drain_timeout_s": 10,
            "cluster": {"local": {"workers": 2, "threads_per_worker": 1}},
            "log": {"format": "json"},
        },
    )
    env = {"TIDEGATE_DRAIN_TIMEOUT_S": "20", "TIDEGATE_CLUSTER__LOCAL__WORKERS": "3"}
    overrides = {"cluster.local.workers": 4, "listen": None, "log.level": "debug"}
    config = load_config(path, env, overrides)
    assert config.listen == "127.0.0.1:9000"  # file; the None flag does not unset it
    assert config.drain_timeout_s == 20.0  # environment over file
    assert config.cluster.local.workers == 4  # flag over environment over file
    assert config.cluster.local.threads_per_worker == 1  # file, next to overridden keys
    assert (config.log.format, config.log.level) == ("json", "DEBUG")
    assert config.flush.params == 1000  # default


def test_relative_paths_in_file_are_relative_to_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state_dir, output_root, token_file and code_roots resolve against the file's dir."""
    monkeypatch.chdir(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(
        etc,
        {
            "state_dir": "state",
            "output_root": "../outputs",
            "security": {"token_file": "token", "code_roots": ["models", "/opt/models"]},
        },
    )
    config = load_config(Path("etc/tidegate.yaml"), {})
    assert config.state_dir == etc / "state"
    assert config.output_root == tmp_path / "outputs"
    assert config.security.token_file == etc / "token"
    assert config.security.code_roots == [etc / "models", Path("/opt/models")]
    assert path.exists()


def test_relative_paths_from_env_and_flags_are_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths given as variables or flags resolve against the current directory."""
    monkeypatch.chdir(tmp_path)
    env = {"TIDEGATE_STATE_DIR": "state", "TIDEGATE_SECURITY__CODE_ROOTS": "a, b/../c"}
    config = load_config(None, env, {"output_root": "out", "security.token_file": "tok"})
    assert config.state_dir == tmp_path / "state"
    assert config.security.code_roots == [tmp_path / "a", tmp_path / "c"]
    assert config.output_root == tmp_path / "out"
    assert config.security.token_file == tmp_path / "tok"
    for p in (config.state_dir, config.output_root, *config.security.code_roots):
        assert p.is_absolute()


def test_env_lists_are_comma_separated() -> None:
    """TIDEGATE_SECURITY__ALLOWED_MODULES is split on commas, blanks dropped."""
    env = {"TIDEGATE_SECURITY__ALLOWED_MODULES": "sir, mypkg.models,,"}
    assert load_config(None, env).security.allowed_modules == ["sir", "mypkg.models"]
    assert load_config(None, {"TIDEGATE_SECURITY__ALLOWED_MODULES": ""}).security == (
        DaemonConfig().security
    )


def test_every_key_has_a_variable() -> None:
    """Each nested key can be set as TIDEGATE_<KEY> with __ between levels."""
    env = {
        "TIDEGATE_LISTEN": "[::1]:8791",
        "TIDEGATE_OUTPUT_ROOT": "/srv/out",
        "TIDEGATE_CLUSTER__LOCAL__THREADS_PER_WORKER": "2",
        "TIDEGATE_CLUSTER__LOCAL__MEMORY_LIMIT": "2GiB",
        "TIDEGATE_CONTROLLER__MEMORY_FRACTION": "0.4",
        "TIDEGATE_CONTROLLER__MIN": "2",
        "TIDEGATE_FLUSH__SECONDS": "2.5",
        "TIDEGATE_SECURITY__MAX_BODY_BYTES": "2048",
        "TIDEGATE_LOG__FORMAT": "json",
    }
    config = load_config(None, env)
    assert (config.host, config.port) == ("::1", 8791)
    assert config.output_root == Path("/srv/out")
    assert config.cluster.local.threads_per_worker == 2
    assert config.cluster.local.memory_limit == "2GiB"
    assert config.controller.overrides() == {"memory_fraction": 0.4, "min_size": 2}
    assert config.flush.seconds == 2.5
    assert config.security.max_body_bytes == 2048
    assert config.log.format == "json"
    address = load_config(None, {"TIDEGATE_CLUSTER__ADDRESS": "tls://sched.example:8786"})
    assert address.cluster.address == "tls://sched.example:8786"


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    """A file of comments, or a section with every key commented out, keeps the defaults."""
    assert load_config(write(tmp_path, "# nothing yet\n"), {}) == DaemonConfig()
    sections = "cluster:\n  # address: tcp://x:1\ncontroller:\nsecurity:\nlog:\nflush:\n"
    assert load_config(write(tmp_path, sections, "b.yaml"), {}) == DaemonConfig()


def test_empty_address_means_embedded_cluster() -> None:
    """cluster.address "" (as an unset-looking variable would give) is the LocalCluster."""
    assert load_config(None, {"TIDEGATE_CLUSTER__ADDRESS": ""}).cluster.address is None


def test_controller_overrides_are_controller_config_fields() -> None:
    """overrides() maps min/max to min_size/max_size and builds a valid ControllerConfig."""
    knobs = ControllerKnobs(
        memory_fraction=0.3, high_water=0.8, low_water=0.6, saturation=4,
        cooldown_s=5, min=2, max=50,
    )
    overrides = knobs.overrides()
    assert overrides == {
        "memory_fraction": 0.3, "high_water": 0.8, "low_water": 0.6, "saturation": 4.0,
        "cooldown_s": 5.0, "min_size": 2, "max_size": 50,
    }
    config = ControllerConfig(**overrides)
    assert (config.min_size, config.max_size, config.low_water) == (2, 50, 0.6)


def test_json_schema_describes_every_section() -> None:
    """config_json_schema() is JSON and lists the top-level keys."""
    schema = json.loads(json.dumps(config_json_schema()))
    assert set(schema["properties"]) == set(DaemonConfig.model_fields)
    assert schema["additionalProperties"] is False


# --- malformed configs --------------------------------------------------------------------

MALFORMED_FILES = [
    pytest.param({"listn": "x"}, "listn", "known fields (listen, state_dir",
                 "did you mean 'listen'", id="unknown-top-level"),
    pytest.param({"cluster": {"local": {"wrokers": 2}}}, "cluster.local.wrokers",
                 "known fields (workers, threads_per_worker, memory_limit)",
                 "did you mean 'workers'", id="unknown-nested"),
    pytest.param({"cluster": {"local": {"workers": 0}}}, "cluster.local.workers",
                 "an integer >= 1", "0", id="workers-zero"),
    pytest.param({"cluster": {"local": {"workers": True}}}, "cluster.local.workers",
                 "an integer >= 1", "true (bool)", id="workers-bool"),
    pytest.param({"cluster": {"local": {"threads_per_worker": 1.5}}},
                 "cluster.local.threads_per_worker", "an integer >= 1", "1.5 (float)",
                 id="threads-float"),
    pytest.param({"cluster": {"local": {"memory_limit": "lots"}}}, "cluster.local.memory_limit",
                 "a size such as 2GiB or 500MB, or auto", "'lots'", id="memory-limit-bad"),
    pytest.param({"cluster": {"local": {"memory_limit": "0GB"}}}, "cluster.local.memory_limit",
                 "a size such as 2GiB", "'0GB'", id="memory-limit-zero"),
    pytest.param({"cluster": {"address": "10.0.0.5:8786"}}, "cluster.address",
                 "scheme://host:port", "'10.0.0.5:8786' (no scheme://)", id="address-no-scheme"),
    pytest.param({"cluster": {"address": "tcp://10.0.0.5"}}, "cluster.address",
                 "scheme://host:port", "no port", id="address-no-port"),
    pytest.param({"cluster": {"address": "tcp://h:1", "local": {"workers": 2}}}, "cluster.local",
                 "no local settings when cluster.address is set", "workers=2",
                 id="address-and-local"),
    pytest.param({"cluster": 5}, "cluster", "a mapping", "5 (int)", id="section-not-mapping"),
    pytest.param({"controller": {"memory_fraction": 1.5}}, "controller.memory_fraction",
                 "a number <= 1", "1.5", id="memory-fraction-above-1"),
    pytest.param({"controller": {"memory_fraction": 0}}, "controller.memory_fraction",
                 "a number > 0", "0", id="memory-fraction-zero"),
    pytest.param({"controller": {"high_water": 0.6, "low_water": 0.7}}, "controller.low_water",
                 "a fraction below controller.high_water (0.6)", "0.7", id="low-above-high"),
    pytest.param({"controller": {"low_water": 0.8}}, "controller.low_water",
                 "below controller.high_water (0.75, the default)", "0.8",
                 id="low-above-default-high"),
    pytest.param({"controller": {"min": 5, "max": 3}}, "controller.max",
                 "an integer >= controller.min (5)", "3", id="max-below-min"),
    pytest.param({"controller": {"min": 20000}}, "controller.min",
                 "<= controller.max (10000, the default)", "20000", id="min-above-default-max"),
    pytest.param({"controller": {"saturation": 0.5}}, "controller.saturation",
                 "a number >= 1", "0.5", id="saturation-below-1"),
    pytest.param({"controller": {"cooldown_s": 86401}}, "controller.cooldown_s",
                 "a number <= 86400", "86401", id="cooldown-too-long"),
    pytest.param({"flush": {"params": 0}}, "flush.params", "an integer >= 1", "0",
                 id="flush-params-zero"),
    pytest.param({"flush": {"seconds": 0}}, "flush.seconds", "a number > 0", "0",
                 id="flush-seconds-zero"),
    pytest.param({"drain_timeout_s": -1}, "drain_timeout_s", "a number >= 0", "-1",
                 id="drain-negative"),
    pytest.param("drain_timeout_s: .inf\n", "drain_timeout_s", "a finite number >= 0", "inf",
                 id="drain-infinite"),
    pytest.param({"drain_timeout_s": "soon"}, "drain_timeout_s", "a number >= 0",
                 "'soon' (str)", id="drain-word"),
    pytest.param({"state_dir": ""}, "state_dir", "a non-empty path", "''", id="state-dir-empty"),
    pytest.param({"output_root": 3}, "output_root", "a path", "3 (int)", id="output-root-int"),
    pytest.param({"security": {"allowed_modules": "sir"}}, "security.allowed_modules", "a list",
                 "'sir' (str)", id="allowed-modules-not-list"),
    pytest.param({"security": {"allowed_modules": ["sir", "my-pkg"]}},
                 "security.allowed_modules[1]", "a module name or prefix", "'my-pkg'",
                 id="allowed-module-bad-name"),
    pytest.param({"security": {"max_body_bytes": 100}}, "security.max_body_bytes",
                 "an integer >= 1024", "100", id="max-body-too-small"),
    pytest.param({"log": {"format": "xml"}}, "log.format", "'text' or 'json'", "'xml'",
                 id="log-format"),
    pytest.param({"log": {"level": "verbose"}}, "log.level", "'DEBUG', 'INFO', 'WARNING' or",
                 "'VERBOSE'", id="log-level"),
    pytest.param({"listen": 8790}, "listen", "host:port", "8790 (int)", id="listen-int"),
    pytest.param("- listen\n", "<top level>", "a mapping of config keys", "['listen'] (list)",
                 id="top-level-list"),
    pytest.param("listen: [127.0.0.1\n", "<yaml>", "valid YAML", "line 2", id="yaml-syntax"),
    pytest.param("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", "<yaml>", "valid YAML",
                 "duplicate key 'listen'", id="yaml-duplicate-key"),
    pytest.param("cluster.address: tcp://h:1\n", "['cluster.address']", "known fields",
                 "unknown field", id="dotted-key-in-file"),
]


@pytest.mark.parametrize(("data", "field", "expected", "got"), MALFORMED_FILES)
def test_malformed_file_names_the_key(
    tmp_path: Path, data: dict[str, Any] | str, field: str, expected: str, got: str
) -> None:
    """A bad config file raises ConfigError naming the file, the dotted key, expected, got."""
    path = write(tmp_path, data)
    error = config_error(path=path, env={})
    assert error.source == str(path)
    first = error.errors[0]
    assert first.field == field
    assert expected in first.expected
    assert got in first.got


MALFORMED_ENV = [
    pytest.param("TIDEGATE_DRAIN_TIMEOUT_S", "soon", "a number >= 0", "'soon'",
                 id="drain-word"),
    pytest.param("TIDEGATE_CLUSTER__LOCAL__WORKERS", "0", "an integer >= 1", "'0'",
                 id="workers-zero"),
    pytest.param("TIDEGATE_CLUSTER__LOCAL__WORKERS", "two", "an integer >= 1", "'two'",
                 id="workers-word"),
    pytest.param("TIDEGATE_CLUSTER__LOCAL__WORKERS", "2.5", "an integer >= 1", "'2.5'",
                 id="workers-fraction"),
    pytest.param("TIDEGATE_CONTROLLER__MEMORY_FRACTION", "1.2", "a number <= 1", "'1.2'",
                 id="memory-fraction-above-1"),
    pytest.param("TIDEGATE_CONTROLLER__LOW_WATER", "0.9", "below controller.high_water", "0.9",
                 id="low-above-default-high"),
    pytest.param("TIDEGATE_FLUSH__SECONDS", "nan", "a finite number > 0", "nan",
                 id="flush-seconds-nan"),
    pytest.param("TIDEGATE_LISTEN", "127.0.0.1", "host:port", "'127.0.0.1' (no port)",
                 id="listen-no-port"),
    pytest.param("TIDEGATE_LISTEN", "::1:8790", "host:port", "in brackets", id="listen-bare-v6"),
    pytest.param("TIDEGATE_CLUSTER__ADDRESS", "scheduler:8786", "scheme://host:port",
                 "no scheme://", id="address-no-scheme"),
    pytest.param("TIDEGATE_CLUSTER__LOCAL__MEMORY_LIMIT", "lots", "a size such as 2GiB",
                 "'lots'", id="memory-limit"),
    pytest.param("TIDEGATE_LOG__FORMAT", "yaml", "'text' or 'json'", "'yaml'", id="log-format"),
    pytest.param("TIDEGATE_SECURITY__MAX_BODY_BYTES", "1k", "an integer >= 1024", "'1k'",
                 id="max-body-word"),
    pytest.param("TIDEGATE_STATE_DIR", "", "a non-empty path", "''", id="state-dir-empty"),
]


@pytest.mark.parametrize(("name", "value", "expected", "got"), MALFORMED_ENV)
def test_malformed_variable_names_the_variable(
    name: str, value: str, expected: str, got: str
) -> None:
    """A bad TIDEGATE_ value raises ConfigError from "environment" naming the variable."""
    error = config_error(path=None, env={name: value})
    assert error.source == "environment"
    first = error.errors[0]
    assert first.field == name
    assert expected in first.expected
    assert got in first.got
    assert "(str)" not in first.got  # every variable is a string; saying so is noise


def test_variable_error_message_reads_plainly() -> None:
    """The message a user reads: source, variable, expected, got."""
    error = config_error(env={"TIDEGATE_DRAIN_TIMEOUT_S": "soon"})
    assert str(error) == "environment: TIDEGATE_DRAIN_TIMEOUT_S: expected a number >= 0, got 'soon'"


def test_list_variable_error_names_the_item() -> None:
    """A bad item of a comma-separated variable is named by its index."""
    error = config_error(env={"TIDEGATE_SECURITY__ALLOWED_MODULES": "sir,bad-name"})
    assert error.errors[0].field == "TIDEGATE_SECURITY__ALLOWED_MODULES[1]"


def test_errors_from_file_and_environment_together(tmp_path: Path) -> None:
    """Problems in both layers are all reported, each named as the user wrote it."""
    path = write(tmp_path, {"flush": {"params": 0}})
    error = config_error(path=path, env={"TIDEGATE_DRAIN_TIMEOUT_S": "-1"})
    assert {e.field for e in error.errors} == {"flush.params", "TIDEGATE_DRAIN_TIMEOUT_S"}
    assert error.source == f"{path} + environment"


def test_variable_fixes_nothing_the_file_broke(tmp_path: Path) -> None:
    """A variable below a section the file gave as a scalar leaves the file's error."""
    path = write(tmp_path, {"cluster": 5})
    error = config_error(path=path, env={"TIDEGATE_CLUSTER__ADDRESS": "tcp://h:1"})
    assert error.errors[0] == FieldError("cluster", "a mapping", "5 (int)")


def test_override_error_names_the_key() -> None:
    """A bad flag value names the dotted key, from "command line"."""
    error = config_error(env={}, overrides={"cluster.local.workers": 0})
    assert error.source == "command line"
    assert error.errors[0] == FieldError("cluster.local.workers", "an integer >= 1", "0")


def test_unknown_override_key() -> None:
    """An override key that is no config key is an error, not ignored."""
    error = config_error(env={}, overrides={"cluster.workers": 2})
    assert error.errors[0].field == "cluster.workers"
    assert "cluster.local.workers" in error.errors[0].expected


def test_unknown_variable_is_an_error() -> None:
    """An unknown TIDEGATE_ variable is named, with the closest known one."""
    error = config_error(env={"TIDEGATE_LISTN": "127.0.0.1:1", "TIDEGATE_FOO": "1"})
    assert error.source == "environment"
    assert [e.field for e in error.errors] == ["TIDEGATE_FOO", "TIDEGATE_LISTN"]
    assert "did you mean TIDEGATE_LISTEN?" in error.errors[1].got
    assert "TIDEGATE_CLUSTER__ADDRESS" in error.errors[0].expected


def test_single_underscore_nesting_is_unknown() -> None:
    """TIDEGATE_CLUSTER_ADDRESS (one underscore) is a typo, not cluster.address."""
    error = config_error(env={"TIDEGATE_CLUSTER_ADDRESS": "tcp://h:1"})
    assert error.errors[0].field == "TIDEGATE_CLUSTER_ADDRESS"
    assert "TIDEGATE_CLUSTER__ADDRESS" in error.errors[0].got


def test_other_parts_variables_are_ignored() -> None:
    """TIDEGATE_ variables of the client and `tidegate run` do not trouble the daemon."""
    env = {name: "not for the daemon" for name in FOREIGN_ENV_VARS}
    env.update(PATH="/usr/bin", OTHER_TIDEGATE_X="1")
    assert load_config(None, env) == DaemonConfig()
    assert {"TIDEGATE_URL", "TIDEGATE_TOKEN", "TIDEGATE_LOG_LEVEL"} <= FOREIGN_ENV_VARS


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming it, not an OSError."""
    error = config_error(path=tmp_path / "absent.yaml", env={})
    assert error.errors[0].field == "<file>"
    assert "absent.yaml" in error.errors[0].got


def test_errors_share_the_spec_errors_base() -> None:
    """ConfigError and SpecError are ValidationFailed; an empty one says its docstring."""
    assert issubclass(ConfigError, ValidationFailed) and issubclass(SpecError, ValidationFailed)
    assert str(ConfigError()) == "daemon config: The daemon configuration is not valid."


# --- the token ----------------------------------------------------------------------------


def test_token_is_read_and_stripped(tmp_path: Path) -> None:
    """token() returns the file's content without surrounding whitespace."""
    (tmp_path / "token").write_text("  s3cret\n")
    config = load_config(None, {}, {"security.token_file": str(tmp_path / "token")})
    assert config.security.token() == "s3cret"


@pytest.mark.parametrize(
    ("content", "got"),
    [pytest.param(None, "No such file", id="missing"), pytest.param(" \n", "empty", id="empty")],
)
def test_token_file_missing_or_empty(tmp_path: Path, content: str | None, got: str) -> None:
    """A token file that is missing or blank is a ConfigError naming security.token_file."""
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    config = load_config(None, {"TIDEGATE_SECURITY__TOKEN_FILE": str(path)})
    with pytest.raises(ConfigError) as info:
        config.security.token()
    error = info.value.errors[0]
    assert error.field == "security.token_file"
    assert str(path) in error.got and got in error.got


# --- listen ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8790", "127.0.0.1", 8790),
        ("[::1]:8790", "::1", 8790),
        ("localhost:0", "localhost", 0),
        (" 127.0.0.1:65535 ", "127.0.0.1", 65535),
    ],
)
def test_listen_parses_host_and_port(listen: str, host: str, port: int) -> None:
    """listen is host:port, IPv6 in brackets; port 0 (any free port) is allowed."""
    config = load_config(None, {"TIDEGATE_LISTEN": listen})
    assert (config.host, config.port) == (host, port)


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port '' is not a number"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:65536", "port 65536 is not in 0-65535"),
        (":8790", "no host"),
        ("::1:8790", "an IPv6 address goes in brackets, e.g. [::1]:8790"),
        ("[::g]:8790", "[::g] is not an IPv6 address in brackets"),
        ("a b:8790", "'a b' is not a host name or address"),
    ],
)
def test_listen_rejects(listen: str, reason: str) -> None:
    """A malformed listen address says what is wrong with it."""
    error = config_error(env={"TIDEGATE_LISTEN": listen}).errors[0]
    assert error.field == "TIDEGATE_LISTEN"
    assert error.expected.startswith("host:port")
    assert error.got == f"{listen!r} ({reason})"


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.3.2.1:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("LocalHost:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("10.1.2.3:1", False),
        ("tidegate.example.org:1", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    """Loopback is 127.0.0.0/8, ::1 or localhost; no name is looked up."""
    config = load_config(None, {"TIDEGATE_LISTEN": listen}, {"security.token_file": "/t"})
    assert config.is_loopback() is loopback


def test_public_listen_with_token_file_loads() -> None:
    """A non-loopback address is accepted once a token file is configured."""
    env = {"TIDEGATE_LISTEN": "0.0.0.0:8790", "TIDEGATE_SECURITY__TOKEN_FILE": "/etc/t"}
    config = load_config(None, env)
    assert not config.is_loopback() and config.security.token_file == Path("/etc/t")


# --- the shipped example --------------------------------------------------------------------


def test_shipped_config_loads_with_documented_defaults() -> None:
    """config/tidegate.yaml validates and, token_file and allowed_modules aside, equals
    the defaults. The shipped allowlist is explicit: empty would allow any module."""
    config = load_config(SHIPPED, {})
    assert config.security.token_file == Path("/etc/tidegate/token")
    assert config.security.allowed_modules == ["tidegate.workloads"]
    as_default = config.model_copy(
        update={"security": config.security.model_copy(
            update={"token_file": None, "allowed_modules": []})}
    )
    assert as_default == DaemonConfig()


def test_shipped_config_sets_every_key() -> None:
    """The example shows every key, so a reader sees all there is."""
    data = yaml.safe_load(SHIPPED.read_text())

    def keys(model: type[Any], node: dict[str, Any], at: str = "") -> None:
        assert set(node) == set(model.model_fields), at or "top level"
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and hasattr(info.annotation, "model_fields"):
                keys(info.annotation, node[name], f"{at}{name}.")

    keys(DaemonConfig, data)


def test_shipped_config_states_controller_defaults_truly() -> None:
    """The [default] in each controller comment is ControllerConfig's default."""
    defaults = ControllerConfig()
    names = {"min": "min_size", "max": "max_size"}
    stated = re.findall(r"^  (\w+): null .*\[([\d.]+)\]$", SHIPPED.read_text(), re.M)
    assert {k for k, _ in stated} == set(ControllerKnobs.model_fields)
    for knob, text in stated:
        assert float(text) == getattr(defaults, names.get(knob, knob)), knob
