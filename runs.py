"""Checkpoints and the record of a run: checkpoint-N folders written by accelerate (in diffusers' layout where
other tools read them), found, rotated and checked for resume; and the record every run leaves beside its results
(resolved config, command line, versions, hardware, the code as it ran)."""

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import cli
import export
import families
import objectives


# ----------------------------------------------------------------------------------------------------------------
# The record every run leaves next to its results


def library_versions():
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "xformers", "peft", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware():
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_record(config, script):
    """Resolved config, command line, versions, git commit and hardware: enough to rerun the job months later.
    Secrets (SECRET_FLAGS) are redacted in the config and in the command line."""
    return {
        "script": os.path.basename(script),
        "command": shlex.join(cli.redact_argv([sys.executable] + sys.argv)),
        "config": cli.redact(config),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(),
    }


def subject_prompts(config, key="instance_prompt"):
    """Each subject's instance (or class) prompt: several with --concepts_list, else the run's one."""
    return [str(s.get(key)) for s in config.get("subjects") or [config]]


def save_code(folder, script):
    """The script and the suite's modules it imported (those beside it) as they ran, beside the run record: research
    forks are seldom committed, so the git commit alone does not say what ran."""
    here = Path(script).resolve().parent
    files = [Path(m.__file__) for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)]
    sources = {Path(script).resolve()} | {f.resolve() for f in files if f.is_absolute() and f.parent.resolve() == here}
    Path(folder, "code").mkdir(parents=True, exist_ok=True)
    for source in sorted(sources):
        shutil.copyfile(source, Path(folder, "code", source.name))


def scrub_records(*folders):
    """Redact secrets in the run records (run_config.json) of run folders and their checkpoints that an earlier
    version of this suite wrote in plain text, and say so. Returns the records it rewrote."""
    scrubbed = []
    for path in sorted({p for f in folders for p in [Path(f, "run_config.json"), *Path(f).glob("checkpoint-*/run_config.json")]}):
        try:
            record = json.loads(path.read_text())
            config = record["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        words = str(record.get("command", "")).split()
        if cli.redact(config) != config or cli.redact_argv(words) != words:
            write_json(path, {**record, "config": cli.redact(config), "command": " ".join(cli.redact_argv(words))})
            scrubbed.append(path)
    if scrubbed:
        cli.note(f"redacted a Hub token that an older version wrote into {len(scrubbed)} run record(s) such as "
             f"{scrubbed[0]}; its logs may still hold it: revoke it at huggingface.co/settings/tokens")
    return scrubbed


def write_json(path, obj):
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints: `checkpoint-N` folders written by accelerate's save_state, renamed into place when complete


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what every accelerate back end writes for our trainer state, plus our run record; the weights in one of these
# layouts: diffusers' (export.diffusers_checkpoints: unet/, or the LoRA file), accelerate's own, DeepSpeed's, FSDP's
CHECKPOINT_FILES = ("random_states_0.pkl", "custom_checkpoint_0.pkl", "run_config.json")
FSDP_WEIGHTS = ("pytorch_model_fsdp_0", "pytorch_model_fsdp.bin")  # FSDP's sharded and full layouts
CHECKPOINT_WEIGHTS = (*families.DENOISERS, families.LORA_WEIGHTS, "model.safetensors", "pytorch_model", *FSDP_WEIGHTS)


def list_checkpoints(output_dir):
    """(step, path) of the finished checkpoints in a run folder, oldest first. Unfinished ones (`*.tmp`) don't match."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()] \
        if folder.is_dir() else []
    return sorted(found)


def remove_oldest(output_dir, prefix, keep):
    """Keep the newest `keep` finished `prefix-N` folders. Rotation happens after the new one is complete, so an
    interrupted save never costs the previous checkpoint (accelerate's own rotation deletes first)."""
    folders = sorted((int(p.name.split("-")[1]), p) for p in Path(output_dir).glob(f"{prefix}-*")
                     if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, folder in folders[:-keep] if keep else []:
        shutil.rmtree(folder)


def check_checkpoint(path):
    """Refuse a folder that is not a whole checkpoint, before anything loads; return the run record it carries."""
    path = Path(path)
    if not path.is_dir():
        cli.fail(f"checkpoint not found: {path}")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any((path / name).exists() for name in CHECKPOINT_WEIGHTS):
        missing.append("the trained weights")
    if not missing:
        try:
            record = json.loads((path / "run_config.json").read_text())
            num_processes = record["config"]["num_processes"]
        except (ValueError, KeyError, TypeError):
            cli.fail(f"{path} is not a complete training checkpoint (unreadable run_config.json)")
        # every process saved its own random state
        missing = [f"random_states_{i}.pkl" for i in range(num_processes) if not (path / f"random_states_{i}.pkl").is_file()]
    if missing:
        cli.fail(f"{path} is not a complete training checkpoint (missing {', '.join(missing)})")
    from accelerate.utils import parse_flag_from_env

    if any((path / name).exists() for name in FSDP_WEIGHTS) and not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        cli.fail(f"{path} was written by FSDP (weights and optimizer in its layout): resume it under an FSDP accelerate "
                 "config (accelerate launch --config_file ...)")
    # a damaged file would fail mid-load with a message that names none, or (an RNG state) be skipped by accelerate
    # with a note at INFO level, and the resume would silently not be exact
    weights = [p.relative_to(path) for p in [*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]]
    for name in [*CHECKPOINT_FILES, *(f"random_states_{i}.pkl" for i in range(1, num_processes)), *weights]:
        try:
            if (path / name).stat().st_size == 0:
                raise ValueError("empty")
            if str(name).endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path / name, "pt") as f:
                    f.keys()
            elif str(name).startswith("random_states"):
                torch.load(path / name, weights_only=False)
        except Exception as e:
            cli.fail(f"{path / name} is damaged ({cli.first_line(e)}): resume from another checkpoint")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints in diffusers' layout, through accelerate's hooks


def diffusers_checkpoints(accelerator, family, lora, names):
    """Training checkpoints whose weights other tools load: checkpoint-N/unet (and text_encoder, text_encoder_2 when
    they train) as `from_pretrained(..., subfolder="checkpoint-N/unet")` reads them, or a LoRA run's adapter files.
    accelerate's save/load hooks take the model over; it saves and loads the rest of the training state as before.
    The weights are written once, in fp32, so a resume stays exact; a checkpoint of accelerate's own layout
    (model.safetensors) still resumes. DeepSpeed and FSDP keep their sharded formats."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return

    def trained(model):
        model = accelerator.unwrap_model(model)
        return {name: (getattr(model, name), getattr(model, name).state_dict()) for name in names}

    def save(models, weights, folder):
        if accelerator.is_main_process:
            rows = accelerator.unwrap_model(models[0]).token_embeddings()  # pivotal tuning's, in fp32
            if rows:
                export.save_token_embeddings(Path(folder, families.EMBEDDINGS.format(name="checkpoint")), family, rows, torch.float32)
            if lora:
                export.save_lora(folder, family, torch.float32, trained(models[0]))
            for name, (module, _) in {} if lora else trained(models[0]).items():
                module.save_pretrained(Path(folder, name), safe_serialization=True)
        weights.pop()  # accelerate saves nothing more of the model

    def load(models, folder):
        from safetensors.torch import load_file

        if Path(folder, "model.safetensors").is_file():
            return  # accelerate's own layout: accelerate loads it
        model = accelerator.unwrap_model(models[0])
        if model.new_token_ids:
            state = load_file(Path(folder, families.EMBEDDINGS.format(name="checkpoint")))
            model.set_token_embeddings([state[key] for key in family.embedding_keys])
        modules = trained(models.pop())  # and nothing of the model is left for accelerate to load
        if not lora:
            for name, (module, _) in modules.items():
                module.load_state_dict(families.module_keys({k: v for f in sorted(Path(folder, name).glob("*.safetensors"))
                                                       for k, v in load_file(f).items()}, module))
            return
        export.load_lora(folder, family, {name: module for name, (module, _) in modules.items()})

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, args, state, record):
    """accelerate's save_state into checkpoint-N.tmp on every process, then a rename: `latest` only ever sees
    finished checkpoints."""
    final = Path(args.output_dir, f"checkpoint-{state.global_step}")
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "run_config.json", record)  # a checkpoint carries its config (resume, infer.py)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        remove_oldest(args.output_dir, "checkpoint", args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def stop_requests():
    """SIGTERM (clusters, spot instances) or Ctrl-C while inside: the names of the signals that came, for the loop to
    finish its optimizer step, save a checkpoint and exit 0. A second signal stops at once. The previous handlers
    come back on the way out."""
    came = []

    def request_stop(signum, frame):
        came.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield came
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def clear_unstarted_run(output_dir, logging_dir):
    """A run that failed after writing its record and before saving anything (no checkpoint, no weights: a photo
    that went away, memory) leaves only records: they go, with a note, so that the corrected command starts there
    instead of being told the folder is not empty."""
    records = {"run_config.json", "code", "validation", "wandb", Path(logging_dir).parts[0] if logging_dir else "", LOCK}
    folder = Path(output_dir)
    if not (folder / "run_config.json").is_file() or any(p.name not in records for p in folder.iterdir()) or any(
            p.name != "step-000000.png" for p in (folder / "validation").glob("*")):  # the base model's images only
        return
    cli.note(f"{folder} holds only the record of a run that saved nothing (no checkpoint, no weights): starting "
             "over there")
    for path in folder.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


LOCK = ".dreambooth.lock"
_HELD = {}  # folder -> (its open lock file, made by this run): the lock lasts as long as the file stays open


def take_lock(folder):
    """(the open lock file, None) when this process got output_dir's lock; (None, its holder) when another has it."""
    import fcntl

    handle = open(Path(folder, LOCK), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, holder
    return handle, None


def check_output_dir_free(output_dir):
    """Before anything loads: a folder another run holds (its lock taken and let go again here) stops in one line
    naming the holder."""
    if os.name == "posix" and Path(output_dir, LOCK).is_file() and str(Path(output_dir).resolve()) not in _HELD:
        handle, holder = take_lock(output_dir)
        if handle:
            handle.close()
        refuse_held(output_dir, holder)


def refuse_held(output_dir, holder):
    if holder:
        cli.fail(f"{output_dir} is in use by another training run ({holder}): wait for it to end, or give another "
                 "--output_dir")


def hold_output_dir(accelerator, output_dir):
    """One run per output folder: the main process holds an exclusive lock on output_dir/.dreambooth.lock for the
    run's life, the holder's process id and host written in it. The kernel drops the lock on any exit (a crash or
    kill -9 too), so a stale file never blocks a new run. A second run into the folder stops in one line naming the
    holder, all its processes alike. The file goes at exit, and the folder too if this run made it and wrote
    nothing else (a failed start leaves nothing behind)."""
    import atexit
    import socket

    if os.name != "posix" or str(Path(output_dir).resolve()) in _HELD:  # no advisory locks; this process has it
        return
    holder = [None]
    if accelerator.is_main_process:
        folder = Path(output_dir)
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        handle, holder[0] = take_lock(folder)
        if handle:
            handle.truncate(0)
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            _HELD[str(folder.resolve())] = handle, made
            atexit.register(release_output_dir, folder)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(holder)
    refuse_held(output_dir, holder[0])


def release_output_dir(folder):
    """At the end of the run and at exit: the lock file removed while still held (a run that opened it meanwhile is
    refused, one that comes after makes a new one), then the folder too if this run made it and left nothing in it."""
    handle, made = _HELD.pop(str(Path(folder).resolve()), (None, False))
    if handle is None:
        return
    with contextlib.suppress(OSError):
        Path(folder, LOCK).unlink()
        handle.close()
        if made and not any(Path(folder).iterdir()):
            Path(folder).rmdir()


def start_trackers(accelerator, args, record):
    """accelerate's trackers, given the resolved config of run_config.json plus versions, command line and commit."""
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in record["config"].items()}
    config.update({f"version/{k}": str(v) for k, v in record["versions"].items()}, command=record["command"],
                  git_commit=str(record["git_commit"]))
    accelerator.init_trackers(args.tracker_project_name, config=config,
                              init_kwargs={"wandb": {"name": args.run_name, "dir": args.output_dir}})


# ----------------------------------------------------------------------------------------------------------------
# What the loop logs


class Window:
    """The losses and timings between two logging steps: each loss summed over the micro-batches, then averaged over
    them and, in one reduce (the step's only wait for the GPU), over the processes, with the flag that tells every
    process whether any of them was asked to stop."""

    def __init__(self, device):
        self.device, self.sums = device, {name: torch.zeros((), device=device) for name in objectives.LOSSES}
        self.micro_steps, self.steps, self.seconds, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, losses):
        for name, value in losses.items():
            self.sums[name] += value.detach()
        self.micro_steps += 1

    def step_done(self):
        self.steps, self.seconds = self.steps + 1, self.seconds + time.perf_counter() - self.t0

    def means(self, accelerator, stop):
        """{loss name: mean, "stop": > 0 if a process was asked to stop, "seconds_per_step"}; the window starts again."""
        values = {name: value / self.micro_steps for name, value in self.sums.items()}
        values["stop"] = torch.tensor(float(stop), device=self.device)
        means = dict(zip(values, accelerator.reduce(torch.stack(list(values.values())), reduction="mean").tolist()))
        means["seconds_per_step"] = self.seconds / self.steps
        for value in self.sums.values():
            value.zero_()
        self.micro_steps, self.steps, self.seconds = 0, 0, 0.0
        return means
