"""Flags, --config files and errors, shared by the scripts: numeric flag types that declare their range, the
parser with --config, secrets kept out of every record, one-line errors without a traceback, and the checks of the
launch and of optional packages that run before anything loads."""

import argparse
import difflib
import logging
import os
import sys
import warnings
from pathlib import Path

import torch


# ----------------------------------------------------------------------------------------------------------------
# Errors the user can fix: one line, non-zero exit, no traceback


# Flags whose value is a credential. The rule for every script: a secret is used, never recorded. Its value is
# redacted in sys.argv as soon as the flags are parsed (so trackers that record the command line, such as W&B, never
# see it), and in every run record (run_config.json, checkpoints, the trackers' config). Add any new credential here.
SECRET_FLAGS = frozenset({"hub_token"})
REDACTED = "***"
# Library warnings about things the suite never uses: transformers' image processors (they want torchvision) and
# bitsandbytes' 4-bit CPU kernels. Dropped by a filter on their loggers; every other warning stays.
IRRELEVANT_WARNINGS = {"transformers.utils.import_utils": "requires torchvision (not installed)",
                       "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}
for _logger, _text in IRRELEVANT_WARNINGS.items():
    logging.getLogger(_logger).addFilter(lambda record, text=_text: text not in record.getMessage())
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")  # diffusers' call


def fail(message):
    """Stop with one line that names the problem. SystemExit prints it to stderr and exits 1, without a traceback.
    An open progress bar is closed first, so the line stands alone and the bar is not drawn again after it."""
    for bar in list(getattr(sys.modules.get("tqdm.std"), "tqdm", object).__dict__.get("_instances", ())):
        bar.close()
    raise SystemExit(f"error: {message}")


class InputError(Exception):
    """Bad input met during the run (a photo changed or deleted since the start): an ordinary exception, so that it
    crosses a DataLoader worker, which cannot exit the run itself; run() turns it into fail()'s one line."""


def note(message):
    print(f"note: {message}", file=sys.stderr)



def note_unneeded(args, parser, needs):
    """One note per missing need, naming the flags given without it; `needs`: {flag: (the need, whether args have
    it)} (train_dreambooth.NEEDS)."""
    unused = {}
    for flag, (need, has) in needs.items():
        if getattr(args, flag) != parser.get_default(flag) and not has(args):
            unused.setdefault(need, []).append(f"--{flag}")
    for need, flags in unused.items():
        note(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect without {need}: ignored")

def first_line(error, limit=300):
    """The first telling line of an exception's message (library errors run to several, and some open with a bare
    "Error(s) in ...:"), cut to `limit` characters, or the exception's type when it has no message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    line = next((line for line in lines if not line.endswith(":")), lines[0] if lines else error.__class__.__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def check_writable(path, what):
    """Fail now, before any model loads, when `path` (a folder, existing or not) cannot be written: a file in its
    place, or no permission. The probe is a temporary folder in its nearest existing ancestor, removed at once."""
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(f"{what} is a file, not a folder: {path}")
    ancestor = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not ancestor.is_dir():
        fail(f"{what} {path} is inside a file: {ancestor}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
    except OSError as e:
        fail(f"cannot write {what} {path}: {e.strerror} ({ancestor})")


def run(main):
    """Call a script's main(); a full disk (or quota) ends in one line, not a traceback: what was being written is a
    temporary file or folder, so nothing is left that looks complete."""
    import errno

    try:
        main()
    except InputError as e:  # from a DataLoader worker it comes back with the worker's traceback in its text
        fail(str(e).strip().splitlines()[-1].removeprefix(f"{InputError.__module__}.InputError: "))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(f"no space left on the device while writing {e.filename or 'the results'}: free some space and run again")
    except Exception as e:  # safetensors reports a full disk as its own error type, with the OS error in the text
        if type(e).__name__ != "SafetensorError" or not any(
                k in str(e) for k in ("StorageFull", "QuotaExceeded", "No space left", "code: 28", "code: 122")):
            raise
        fail("no space left on the device while writing a .safetensors file: free some space and run again")


# ----------------------------------------------------------------------------------------------------------------
# Flags and --config


def number(kind, low=None, high=None, above=None, below=None, multiple_of=None):
    """An argparse type for a number in a range, declared with its flag: the command line and --config go through
    it alike, so a value out of range is one line before anything loads."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        for bad, says in ((value != value or value in (float("inf"), float("-inf")), "a finite number"),
                          (low is not None and value < low, f"at least {low}"),
                          (above is not None and value <= above, f"more than {above}"),
                          (high is not None and value > high, f"at most {high}"),
                          (below is not None and value >= below, f"less than {below}"),
                          (multiple_of and value % multiple_of, f"a multiple of {multiple_of}")):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {says}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def boolean(text):
    """An argparse type for an on/off setting whose default is on (diffusers' --prodigy_decouple True)."""
    if str(text).lower() in ("true", "1", "yes", "on"):
        return True
    if str(text).lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# The ranges the scripts' numeric flags use
COUNT = number(int, low=1)  # steps, images, batch sizes
NATURAL = number(int, low=0)
POSITIVE = number(float, above=0)
NONNEGATIVE = number(float, low=0)
FRACTION = number(float, low=0, below=1)  # Adam's betas, dropout
SIZE = number(int, low=8, multiple_of=8)  # pixels: the VAE downsamples by 8
SEED = number(int, low=0, high=2**32 - 1025)  # numpy's limit, less room for a seed per process


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for switches and unset values, nor where the help text already says its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake in one line: the error, a close match for a mistyped flag, and a pointer to --help
    instead of the whole usage."""

    def __init__(self, doc, script):
        super().__init__(prog=os.path.basename(script), description=doc.split("\n\n")[0], formatter_class=HelpFormatter)

    def error(self, message):
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        unknown = message.split("unrecognized arguments: ")[-1].split() if "unrecognized arguments" in message else []
        hints = [f"did you mean {close[0]}?" for arg in unknown if arg.startswith("--")
                 for close in [difflib.get_close_matches(arg.split("=")[0], options, n=1)] if close]
        self.exit(2, f"error: {message}{' (' + '; '.join(hints) + ')' if hints else ''}; see {self.prog} --help\n")


def parse_args_with_config(parser, argv=None):
    """parser.parse_args with `--config run.yaml`: the file's keys (flag names without the dashes) become defaults,
    flags on the command line override them (a repeatable flag given on the command line replaces the file's list),
    and a key that is no flag is an error that names it."""
    parser.add_argument("--config", default=None, help="YAML file of flag values; flags on the command line override it")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return hide_secrets(parser.parse_args(argv), argv)
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read config file {path}: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        fail(f"config file {path} is not a mapping of flag names to values")
    actions = {opt.lstrip("-"): a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}
    unknown = [str(k) for k in values if str(k).replace("-", "_") not in actions or k in ("help", "config")]
    if unknown:
        fail(f"config file {path} has unknown key(s): {', '.join(unknown)} (keys are flag names without the dashes)")
    defaults, lists = {}, {}
    for key, value in values.items():
        action = actions[key.replace("-", "_")]
        try:
            if action.nargs == 0:  # a switch such as --train_text_encoder
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif action.nargs == "?" and action.const is not None and isinstance(value, bool):
                value = action.const if value else action.default  # true: the bare flag (--aspect_ratio_buckets)
            elif getattr(action, "structured", False) and isinstance(value, list):
                pass  # --concepts_list: here the data itself (a path on the command line), checked by its reader
            elif value is not None:  # each value goes through the flag's own type, as its text would on the command line
                many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
                items = value if isinstance(value, list) and many else [value]
                for v in items:
                    if isinstance(v, (list, dict)) or not (action.type or isinstance(v, str)):
                        raise ValueError("expected text" if not action.type else "expected one value")
                items = [action.type(str(v)) if action.type else v for v in items]
                for v in items:
                    if action.choices and v not in action.choices:
                        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
                value = items if many else items[0]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            fail(f"config file {path}: bad value {value!r} for {key}: {e}")
        if isinstance(action, argparse._AppendAction):
            lists[action.dest] = value
        action.required = False
        defaults[action.dest] = value
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for dest, from_file in lists.items():  # argparse appends command-line values to a list default: keep only those
        if len(getattr(args, dest)) > len(from_file):
            setattr(args, dest, getattr(args, dest)[len(from_file):])
    return hide_secrets(args, argv)


def redact_argv(argv):
    """The command line with the value of every SECRET_FLAGS flag replaced by REDACTED, in any spelling argparse
    accepts: `--hub_token X`, `--hub_token=X` and abbreviations such as `--hub_tok X`."""
    def secret(option):
        return len(option) > 2 and any(f"--{name}".startswith(option) for name in SECRET_FLAGS)

    out, hide_next = [], False
    for arg in argv:
        option, eq, _ = arg.partition("=")
        out.append(REDACTED if hide_next else f"{option}={REDACTED}" if eq and secret(option) else arg)
        hide_next = not hide_next and not eq and secret(arg)
    return out


def hide_secrets(args, argv=None):
    """After parsing: take secrets given on the command line out of sys.argv (W&B, for one, records sys.argv), with a
    note that the shell history still has them."""
    given = [name for name in SECRET_FLAGS if getattr(args, name, None)]
    if given and argv is None and redact_argv(sys.argv) != sys.argv:
        sys.argv[:] = redact_argv(sys.argv)
        if os.environ.get("RANK", "0") == "0":
            note(f"--{given[0]} on the command line stays in your shell history: prefer `hf auth login` or the "
                 "HF_TOKEN environment variable (this run never writes the token)")
    return args


def redact(config):
    """A copy of a config dict with the values of SECRET_FLAGS replaced by REDACTED."""
    return {k: REDACTED if k in SECRET_FLAGS and v else v for k, v in config.items()}


def add_model_args(parser, model_help="hub id or local diffusers pipeline folder of the base model, or one .safetensors "
                                      "file in the web UIs' layout"):
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", "--model", required=True, help=model_help)
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model")
    group.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    group.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16")
    group.add_argument("--single_file_config", default=None,
                       help="for a model given as one .safetensors file: a diffusers folder or hub id with its configs")
    return group


# ----------------------------------------------------------------------------------------------------------------
# Optional packages and the launch


def require(module, flag):
    """One line with the pip command when an optional package that a flag needs is not installed."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        fail(f"{flag} needs {module}: pip install {module}")


def check_wandb(flag):
    """wandb installed, and no login prompt ahead: offline mode, or a key in WANDB_API_KEY or ~/.netrc (`wandb login`)
    (W&B would otherwise stop the run to ask for one)."""
    require("wandb", flag)
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    from requests.utils import get_netrc_auth

    if get_netrc_auth(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) is None:
        fail("--report_to wandb needs a W&B login: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline")


def check_launch():
    """One line instead of a CUDA traceback or a silent mistake when the launch cannot work as asked."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    from accelerate.utils import parse_flag_from_env

    if processes_here > 1 and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        gpus = torch.cuda.device_count()
        if gpus == 0:  # accelerate would run each process alone, every one writing the same files
            fail(f"{processes_here} processes were launched on a machine without GPUs: "
                 "add --cpu to `accelerate launch` (or ACCELERATE_USE_CPU=true) to train on CPU processes")
        if processes_here > gpus:
            fail(f"the launch asks for {processes_here} processes on this machine, which has {gpus} GPU(s): "
                 "lower --num_processes (or num_processes in the accelerate config)")
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and parse_flag_from_env("ACCELERATE_USE_CPU") and \
            os.environ.get("RANK", "0") == "0":
        note("the accelerate config asks for FSDP, which needs GPUs: accelerate runs these CPU processes as plain data "
             "parallelism (each holds the whole model)")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            fail("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed")


def check_deepspeed(accelerator, use_8bit_adam):
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed and use_8bit_adam and deepspeed.deepspeed_config.get("zero_optimization", {}).get(
            "offload_optimizer", {}).get("device", "none") != "none":
        fail("--use_8bit_adam does not combine with DeepSpeed's optimizer offload (DeepSpeed replaces the optimizer "
             "with its own CPU Adam): leave --use_8bit_adam out")


def partial_state():
    """accelerate's PartialState, honouring ACCELERATE_USE_CPU as Accelerator does (PartialState alone does not, and
    processes launched on a machine without GPUs would then each run alone)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
