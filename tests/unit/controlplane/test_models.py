"""Body models: strictness and serde-like messages, and the config-file schema."""

from __future__ import annotations

import pytest

from controlplane.models import (
    BodyError,
    BootSource,
    CpuConfig,
    Drive,
    LoggerConfig,
    MmdsConfig,
    NetworkInterface,
    VmmConfigFile,
    parse_body,
)


def message(model, raw: str) -> str:
    with pytest.raises(BodyError) as err:
        parse_body(model, raw)
    return str(err.value).removeprefix("An error occurred when deserializing the json body of a request: ")


def test_no_type_coercion():
    assert message(BootSource, '{"kernel_image_path": 5}') == (
        "invalid type: integer `5`, expected a string at `kernel_image_path`."
    )
    assert "expected a boolean" in message(Drive, '{"drive_id": "a", "is_root_device": 1}')


def test_unknown_field_lists_the_known_ones():
    assert message(BootSource, '{"kernel_image_path": "k", "initrd": "i"}') == (
        "unknown field `initrd`, expected one of `kernel_image_path`, `boot_args`, `initrd_path`."
    )


def test_nested_errors_name_their_field():
    raw = '{"iface_id": "e", "host_dev_name": "t", "rx_rate_limiter": {"ops": {"size": 1}}}'
    assert message(NetworkInterface, raw) == "missing field `refill_time` at `rx_rate_limiter.ops`."


def test_logger_level_is_case_insensitive():
    assert parse_body(LoggerConfig, '{"level": "WARNING"}').level == "Warning"


def test_mmds_ipv4_must_parse():
    assert "invalid IPv4 address `169.254.999.1`" in message(
        MmdsConfig, '{"network_interfaces": [], "ipv4_address": "169.254.999.1"}'
    )


def test_cpu_template_indices_and_bitmaps():
    ok = '{"cpuid_modifiers": [{"leaf": "0b1", "subleaf": "7", "flags": 1, "modifiers": []}]}'
    assert parse_body(CpuConfig, ok).cpuid_modifiers[0].leaf == "0b1"
    assert "invalid CPUID index `0x1_0000_0000`" in message(
        CpuConfig, '{"cpuid_modifiers": [{"leaf": "0x1_0000_0000", "subleaf": "0", "flags": 0, "modifiers": []}]}'
    )
    assert "invalid KVM capability `x1`" in message(CpuConfig, '{"kvm_capabilities": ["x1"]}')


def test_config_file_sections_use_firecrackers_names():
    raw = """{
        "boot-source": {"kernel_image_path": "/k"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "mmds-config": {"network_interfaces": ["eth0"]},
        "cpu-config": "/path/template.json"
    }"""
    config = parse_body(VmmConfigFile, raw)
    assert config.machine_config is not None and config.machine_config.vcpu_count == 2
    assert config.cpu_config == "/path/template.json"
    assert config.drives == []
    assert "missing field `boot-source`" in message(VmmConfigFile, "{}")
    assert "unknown field `boot_source`" in message(VmmConfigFile, '{"boot_source": {}}')
