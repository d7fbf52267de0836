"""`train.py` / `vit train`: absl flags around `vit.trainer.train`.

    python train.py --config=configs/cifar10.py:Ti/4 --workdir=runs/c10 [--config.lr=3e-4]
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import traceback
from typing import Any, NoReturn

from absl import app, flags
from ml_collections import config_flags

from vit import console
from vit.error_text import device_memory_error
from vit.preemption import EXIT_PREEMPTED, START_UP_LINE, PreemptedAtStartUp, stop_at_start_up

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file and its variant: configs/cifar10.py:Ti/4.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Fine-tune from a workdir, checkpoint, .npz or .safetensors "
    "(same as --config.init_from).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Join a multi-host run with jax.distributed.initialize "
    "(same as --config.distributed).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (else JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_WANDB = flags.DEFINE_bool("wandb", None, "Log to Weights & Biases (same as "
                           "--config.wandb.enabled; needs the wandb extra).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also print TensorFlow / absl start-up lines and "
                             "INFO logs (or set VIT_VERBOSE=1).")
flags.register_validator("workdir", lambda v: bool(v),
                         "--workdir is required: pass --workdir=DIR, the run's directory")
flags.mark_flag_as_required("config")


def _run(argv: list[str], none_keys: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from vit.trainer import train  # after flag parsing: importing TF and JAX takes seconds

    config = _CONFIG.value
    with config.unlocked():
        for key in none_keys:
            _set_to_none(config, key)
        for key, value in (("init_from", _INIT_FROM.value), ("distributed", _MULTIHOST.value),
                           ("coordinator_address", _COORDINATOR.value),
                           ("num_processes", _NUM_PROCESSES.value),
                           ("process_id", _PROCESS_ID.value)):
            if value is not None:
                config[key] = value
        if _WANDB.value is not None:
            config.wandb.enabled = _WANDB.value
    console.set_verbose(_VERBOSE.value)  # quiet: absl at WARNING (orbax logs saves at INFO)
    logging.getLogger("vit").setLevel(logging.INFO)
    try:
        try:
            result = train(config, _WORKDIR.value)
        finally:  # the outcome is decided: a SIGTERM from here on does not change what is said
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ValueError, OSError, RuntimeError) as err:  # FileNotFoundError is an OSError
        if os.environ.get("VIT_DEBUG"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(1)
    # Each line in one write: in a multi-host run Gloo's C++ logging shares stdout, and with
    # unbuffered output it would land between print's separate writes of a line and its newline.
    if result.before_first_step:
        _exit_preempted_at_start_up()
    if result.preempted:  # a distinct status, so that a scheduler requeues the job
        sys.stdout.write(f"preempted at step {int(result.state.step)}: checkpoint saved; rerun "
                         f"the same command to resume (exit status {EXIT_PREEMPTED})\n")
        sys.exit(EXIT_PREEMPTED)
    sys.stdout.write("".join(f"{key}: {result.metrics[key]:.4f}\n"
                             for key in sorted(result.metrics) if key.startswith("eval")))


def _exit_preempted_at_start_up() -> NoReturn:
    """A SIGTERM came before the first step: say so in one line, exit EXIT_PREEMPTED."""
    sys.stdout.write(START_UP_LINE + "\n")
    sys.exit(EXIT_PREEMPTED)


def _none_override(arg: str) -> str | None:
    """KEY of a --config.KEY=None argument, else None: absl parses the value as the key's type
    (a float cannot be "None"), so these are set after parsing."""
    name, sep, value = arg.partition("=")
    if sep and value == "None" and name.startswith("--config."):
        return name.removeprefix("--config.")
    return None


def _parent_of(config: Any, key: str) -> tuple[Any, str]:
    """(the node holding dotted `key`, its last part); the node is None where a part is missing."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node.get(name) if hasattr(node, "get") else None
    return (node if hasattr(node, "keys") else None), leaf


def _set_to_none(config: Any, key: str) -> None:
    """config[key] = None for a dotted key; one line (exit 2) for a key the config lacks, or one
    whose default is a value (None would leave it with none)."""
    from vit.config_schema import NONE_ALLOWED, default_config

    node, leaf = _parent_of(config, key)
    if node is None or leaf not in node:
        print(f"error: flag --config.{key}=None: the config has no key {key!r}; see the config "
              "file for the valid keys", file=sys.stderr)
        sys.exit(2)
    default, _ = _parent_of(default_config(), key)
    if (default is not None and leaf in default and default[leaf] is not None
            and key not in NONE_ALLOWED):
        value = default[leaf]
        what = (f"a group of keys such as {key}.{next(iter(value.keys()))}"
                if hasattr(value, "keys") else f"{value!r}")
        print(f"error: flag --config.{key}=None: {key} needs a value (it is not optional; "
              f"its default is {what}); drop the flag or pass a value", file=sys.stderr)
        sys.exit(2)
    node[leaf] = None


def _one_line(err: Exception) -> str:
    """The error line for `err`; an OSError names its path, its reason and what to check, an
    accelerator's out-of-memory error the config keys that lower the memory."""
    out_of_memory = device_memory_error(
        err, "lower config.batch_size, or keep it with config.grad_accum_steps (micro-batches) "
        "or config.model.remat=block")
    if out_of_memory is not None:
        return out_of_memory
    if not isinstance(err, OSError) or err.strerror is None:
        return str(err)
    where = f" {err.filename}" if err.filename else ""
    return (f"cannot use{where} ({type(err).__name__}: [Errno {err.errno}] {err.strerror}): "
            "check that the path exists and is writable and that its disk has space, then "
            "rerun the same command")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad --config file or override reported in one line."""
    try:
        argv = FLAGS(argv)
        _CONFIG.value.get("model")  # a config file that failed to load raises only when read
        return argv
    except (flags.Error, OSError) as err:  # a nested config-file error: keep its last line
        missing = re.search(r"No such file or directory: '([^']+)'", str(err))
        if missing:
            print(f"error: config file {missing.group(1)} does not exist: pass a file of "
                  "configs/ and its variant, e.g. --config=configs/cifar10.py:short",
                  file=sys.stderr)
            sys.exit(2)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        if reason.startswith("ValueError: "):  # the config file's own check names its fix
            print(f"error: {reason.removeprefix('ValueError: ')}", file=sys.stderr)
            sys.exit(2)
        if _names_no_config_key(reason):  # train.py's own flags, a missing --config
            print(f"error: {_flag_error(reason)}", file=sys.stderr)
            sys.exit(2)
    except SyntaxError as err:
        print(f"error: config file {err.filename}, line {err.lineno}: {err.msg}; fix the file",
              file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as err:  # ml_collections: an override of an unknown key
        text = str(err)
        if "has no attribute 'get_config'" in text or _raised_in_config_file(err, argv):
            _config_file_failed(err, argv)
        key = re.search(r"'(\w+)\\?'", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        reason = (f"unknown config key {key.group(1) if key else text!r}"
                  + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    except Exception as err:
        if not _raised_in_config_file(err, argv):
            raise
        _config_file_failed(err, argv)
    print(f"error: {reason}; see the config file for the valid keys", file=sys.stderr)
    sys.exit(2)


def _names_no_config_key(reason: str) -> bool:
    """Whether absl's message is about a flag other than --config.* (or --config missing)."""
    flag = re.match(r"flag --([\w.]+)=", reason)
    return (reason.startswith("Unknown command line flag")
            or (flag is not None and not flag.group(1).startswith("config"))
            or reason.startswith("flag --config=None:"))


def _flag_error(reason: str) -> str:
    """absl's message for a bad flag that is not a --config.* override, with its fix."""
    unknown = re.match(r"Unknown command line flag '([\w-]+)'(?:\. Did you mean: ([\w, ]+?) \?)?",
                       reason)
    if unknown:
        close = [f"--{name.strip()}" for name in (unknown.group(2) or "").split(",") if name]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"unknown flag --{unknown.group(1)}{hint}; run with --helpfull for the flags"
    if reason.startswith("flag --config=None:"):
        return ("--config is required: pass a config file and its variant, e.g. "
                "--config=configs/cifar10.py:short")
    return re.sub(r"^flag --(\w+)=[^:]*: (?=--\1\b)", "", reason)  # the text names the flag


def _config_file(argv: list[str]) -> str | None:
    """The file of the --config=FILE[:variant] argument, if any."""
    for arg in argv:
        if arg.startswith("--config="):
            return arg.removeprefix("--config=").partition(":")[0]
    return None


def _raised_in_config_file(err: BaseException, argv: list[str]) -> bool:
    """Whether `err` came out of the code of the --config file (its get_config, say)."""
    path = _config_file(argv)
    frames = traceback.extract_tb(err.__traceback__)
    return path is not None and any(os.path.samefile(f.filename, path) for f in frames
                                    if os.path.exists(f.filename) and os.path.exists(path))


def _config_file_failed(err: BaseException, argv: list[str]) -> NoReturn:
    """Exit 2 with one line naming the --config file and what its code raised."""
    path = _config_file(argv)
    if "has no attribute 'get_config'" in str(err):
        print(f"error: config file {path} has no get_config(): define get_config(variant=None) "
              "returning the run's ConfigDict, as configs/*.py do", file=sys.stderr)
    else:
        print(f"error: config file {path} failed to load: {type(err).__name__}: {err}",
              file=sys.stderr)
    sys.exit(2)


def _underscored(arg: str) -> str:
    """`--init-from=x` -> `--init_from=x`: dashed spellings of the flags work too."""
    if not arg.startswith("--") or arg.startswith("--config"):
        return arg
    name, sep, value = arg.partition("=")
    return name[:2] + name[2:].replace("-", "_") + sep + value


def _help(program: str) -> str:
    """The training command's usage and its own flags (absl's --help lists only a script's)."""
    flags_help = FLAGS.module_help(sys.modules[__name__]).split("\n", 2)[-1]  # no module line
    return (f"usage: {program} --config=FILE[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...] "
            "[flags]\n\nTrain a ViT (e.g. --config=configs/cifar10.py:short); any config key "
            "can be set with --config.KEY=VALUE (the config file lists them).\n\nflags:\n"
            f"{flags_help}\n\nabsl, JAX and TensorFlow flags: --helpfull\n")


def main(argv: list[str] | None = None, sigterms_before: list[int] | None = None) -> None:
    """Parse absl flags from `argv` (default sys.argv) and train; a SIGTERM before training
    begins exits EXIT_PREEMPTED with one line, as one during training does after its save.

    `sigterms_before` is where train.py's handler kept the SIGTERMs received while it imported
    this module; it is read once this function's handler is in place, so none is missed."""
    signal.signal(signal.SIGTERM, stop_at_start_up)
    if sigterms_before:
        _exit_preempted_at_start_up()
    from vit.save_errors import drop_closed_loop_tracebacks

    drop_closed_loop_tracebacks()
    argv = [_underscored(a) for a in (sys.argv if argv is None else argv)]
    if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
        sys.stdout.write(_help(argv[0]))
        sys.exit(0)
    none_keys = [key for key in map(_none_override, argv) if key is not None]
    # ml_collections finds the --config.* overrides in sys.argv itself: drop them there too.
    argv = [a for a in argv if _none_override(a) is None]
    sys.argv = [a for a in sys.argv if _none_override(a) is None]
    try:
        app.run(lambda rest: _run(rest, none_keys), argv=argv, flags_parser=_parse_flags)
    except PreemptedAtStartUp:
        _exit_preempted_at_start_up()
