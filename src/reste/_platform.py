"""The machine a number was measured on: CPU model and family from ``/proc/cpuinfo``, and a
one-line description of a run's device. Shared by ``summary.json`` and ``reste bench-infer``."""

from __future__ import annotations

import platform

import torch

#: CPU flags (as /proc/cpuinfo spells them) that decide which kernel path can run
ISA_FLAGS = (
    "popcnt",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vpopcntdq",
    "asimd",
    "asimddp",
)


def cpu() -> tuple[str, list[str], str | None]:
    """(model name, the kernel-relevant flags it has, cpu family/model) from /proc/cpuinfo where there is one."""
    name, family = platform.processor() or platform.machine(), None
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or name
    have = set((fields.get("flags") or fields.get("Features") or "").split())
    flags = [f for f in ISA_FLAGS if f in have]
    if "cpu family" in fields:
        family = f"family {fields['cpu family']} model {fields.get('model', '?')}"
    return name, flags, family


def run_machine(device: torch.device | str) -> dict:
    """What a training run ran on, for ``summary.json``: the device (a GPU by name), the CPU, the
    torch threads and the torch version."""
    from . import __version__

    device = torch.device(device)
    name, flags, family = cpu()
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {
        "device": device.type,
        "gpu": gpu,
        "cpu": name,
        "cpu_family_model": family,
        "cpu_flags": flags,
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "reste": __version__,
    }


def describe_machine(machine: dict | None) -> str | None:
    """``AMD EPYC (family 25 model 17), cpu, 2 threads, torch 2.13.0``; ``NVIDIA H200 (GPU), ...``."""
    if not isinstance(machine, dict):
        return None
    cpu_name = machine.get("cpu") or "?"
    if machine.get("cpu_family_model"):
        cpu_name += f" ({machine['cpu_family_model']})"
    if machine.get("device") == "cuda":
        head = f"{machine.get('gpu') or 'a CUDA GPU'} (GPU), host CPU {cpu_name}"
    else:
        threads = machine.get("torch_threads")
        head = f"{cpu_name}, cpu" + (f", {threads} thread{'' if threads == 1 else 's'}" if threads else "")
    return head + (f", torch {machine['torch']}" if machine.get("torch") else "")
