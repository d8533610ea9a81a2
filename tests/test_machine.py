"""memzoo.machine: the processor's name from cpuinfo (x86 and ARM spellings, fallbacks) and the one-line machine
description the results pages and cells record."""

import os
import platform

import pytest
import torch

from memzoo.machine import cpu_model_name, describe_machine


def test_cpu_model_name_reads_the_first_named_processor(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 143\n"
                   "model name\t: Intel(R) Xeon(R)   Processor @ 2.80GHz\n\nprocessor\t: 1\n"
                   "model name\t: Other CPU\n")
    assert cpu_model_name(str(x86)) == "Intel(R) Xeon(R) Processor @ 2.80GHz"  # spaces folded, first processor's
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 48.00\n\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert cpu_model_name(str(arm)) == "Raspberry Pi 4 Model B Rev 1.4"


def test_cpu_model_name_falls_back_to_the_platform_where_cpuinfo_names_nothing(tmp_path):
    fallback = platform.processor() or platform.machine() or "unknown processor"
    assert cpu_model_name(str(tmp_path / "missing")) == fallback
    unnamed = tmp_path / "unnamed"
    unnamed.write_text("processor\t: 0\nmodel name\t:   \n")  # an empty name is no name
    assert cpu_model_name(str(unnamed)) == fallback


def test_describe_machine_names_cores_processor_capability_and_torch():
    line = describe_machine("cpu")
    assert line == (f"{os.cpu_count()} CPU cores: {cpu_model_name()} ({torch.backends.cpu.get_cpu_capability()}), "
                    f"torch {torch.__version__}")
    if not torch.cuda.is_available():
        assert describe_machine() == line  # no GPU: the CPU, as Lightning's auto accelerator trains on
    with pytest.raises(ValueError, match="device 'mps' is neither 'cpu' nor 'cuda'"):
        describe_machine("mps")


@pytest.mark.cuda
def test_describe_machine_names_the_gpu():
    assert describe_machine("cuda") == f"one {torch.cuda.get_device_name()}, torch {torch.__version__}"
