"""MIXED_PRECISION resolved for the device (issue 11, item 7): True is float16 on a GPU;
without one, bfloat16 where the CPU has AVX512_BF16 / AMX, else float32, said once. An explicit
"float16" or "bfloat16" stays what it says."""

import logging

import pytest

from mrcnn import config as config_module
from mrcnn.config import Config, resolve_precision_policy


@pytest.mark.parametrize("value", [True, "float16"])
def test_float16_on_a_gpu(value):
    assert resolve_precision_policy(value, gpu=True, flags=set()) == ("mixed_float16", None)


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_float16_without_gpu_falls_back_to_bfloat16_on_a_bf16_cpu(flag):
    policy, note = resolve_precision_policy(True, gpu=False, flags={"sse2", flag, "avx2"})
    assert policy == "mixed_bfloat16"
    assert "no GPU" in note and flag in note and "mixed_bfloat16" in note


def test_float16_without_gpu_falls_back_to_float32_on_other_cpus():
    policy, note = resolve_precision_policy(True, gpu=False, flags={"sse2", "avx512f"})
    assert policy == "float32"
    assert "no GPU" in note and "float32" in note


@pytest.mark.parametrize("gpu", [True, False])
def test_explicit_dtypes_and_float32_stay(gpu):
    flags = {"avx512_bf16"}
    assert resolve_precision_policy("bfloat16", gpu=gpu, flags=set()) == ("mixed_bfloat16", None)
    assert resolve_precision_policy("float16", gpu=gpu, flags=flags) == ("mixed_float16", None)
    assert resolve_precision_policy(False, gpu=gpu, flags=flags) == ("float32", None)


def test_cpu_flags_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n"
                       "flags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert config_module.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512f", "avx512_bf16",
                                                      "amx_tile"}
    assert config_module.cpu_flags(str(tmp_path / "missing")) == set()


def test_precision_policy_resolves_for_the_device_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(config_module, "_precision_notes_told", set())
    config = Config().override({"MIXED_PRECISION": True})
    monkeypatch.setattr(config_module, "gpu_available", lambda: True)
    assert config.precision_policy == "mixed_float16"
    monkeypatch.setattr(config_module, "gpu_available", lambda: False)
    monkeypatch.setattr(config_module, "cpu_flags", lambda: {"avx512_bf16"})
    with caplog.at_level(logging.WARNING, logger="mrcnn.config"):
        assert config.precision_policy == "mixed_bfloat16"
        assert config.precision_policy == "mixed_bfloat16"
    assert len([r for r in caplog.records if "mixed_bfloat16" in r.getMessage()]) == 1
    monkeypatch.setattr(config_module, "cpu_flags", lambda: set())
    assert config.precision_policy == "float32"
    assert Config().override({"MIXED_PRECISION": "bfloat16"}).precision_policy == \
        "mixed_bfloat16"
