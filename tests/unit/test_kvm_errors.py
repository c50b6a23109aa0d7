from __future__ import annotations

import pytest

from shared.kvm import KvmError, open_kvm


def test_missing_dev_kvm_gives_a_clear_error(tmp_path):
    with pytest.raises(KvmError, match="does not exist: KVM is not available"):
        open_kvm(str(tmp_path / "kvm"))


def test_unopenable_dev_kvm_gives_a_clear_error(tmp_path):
    not_a_device = tmp_path / "kvm"
    not_a_device.mkdir()

    with pytest.raises(KvmError):
        open_kvm(str(not_a_device))
