from __future__ import annotations

from vcpu_worker import i8042 as k


def make() -> tuple[k.I8042, list[str]]:
    events: list[str] = []
    return k.I8042(lambda: events.append("reset"), lambda: events.append("irq")), events


def test_reset_command_calls_on_reset():
    dev, events = make()

    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_RESET_CPU)

    assert events == ["reset"]
    assert dev.metrics["reset_count"] == 1


def test_self_test_answers_0x55():
    dev, _ = make()

    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_SELF_TEST)

    assert dev.read(k.COMMAND_PORT_OFFSET) & k.SB_OUT_DATA_AVAIL
    assert dev.read(k.DATA_PORT_OFFSET) == 0x55


def test_control_register_can_be_written_and_read_back():
    dev, _ = make()
    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_WRITE_CTR)
    dev.write(k.DATA_PORT_OFFSET, 0x47)

    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_READ_CTR)

    assert dev.read(k.DATA_PORT_OFFSET) == 0x47


def test_keyboard_reset_is_acknowledged():
    dev, _ = make()

    dev.write(k.DATA_PORT_OFFSET, 0xFF)

    assert [dev.read(k.DATA_PORT_OFFSET), dev.read(k.DATA_PORT_OFFSET)] == [k.KBD_ACK, k.KBD_RESET_OK]


def test_ctrl_alt_del_queues_scancodes_and_interrupts():
    dev, events = make()

    dev.send_ctrl_alt_del()

    assert events == ["irq"]
    assert bytes(dev.read(k.DATA_PORT_OFFSET) for _ in k.CTRL_ALT_DEL) == k.CTRL_ALT_DEL
    assert events.count("irq") == len(k.CTRL_ALT_DEL)  # one more per byte still pending


def test_empty_buffer_read_is_counted_as_missed():
    dev, _ = make()

    assert dev.read(k.DATA_PORT_OFFSET) == 0
    assert dev.metrics["missed_read_count"] == 1


def test_a_snapshot_restores_the_control_register_a_pending_command_and_unread_bytes():
    dev, _ = make()
    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_WRITE_CTR)
    dev.write(k.DATA_PORT_OFFSET, 0x47)
    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_DISABLE_KBD)
    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_SELF_TEST)  # 0x55 waits to be read
    dev.write(k.COMMAND_PORT_OFFSET, k.CMD_WRITE_OUTP)  # its data byte comes after the snapshot

    restored, events = make()
    restored.restore_state(dev.save_state())
    assert events == []  # neither a reset nor an interrupt

    assert restored.read(k.COMMAND_PORT_OFFSET) & (k.SB_OUT_DATA_AVAIL | k.SB_KBD_ENABLED) == k.SB_OUT_DATA_AVAIL
    assert restored.read(k.DATA_PORT_OFFSET) == 0x55
    restored.write(k.DATA_PORT_OFFSET, 0x03)  # the output port's byte, not a keyboard command
    restored.write(k.COMMAND_PORT_OFFSET, k.CMD_READ_OUTP)
    restored.write(k.COMMAND_PORT_OFFSET, k.CMD_READ_CTR)
    assert (restored.read(k.DATA_PORT_OFFSET), restored.read(k.DATA_PORT_OFFSET)) == (0x03, 0x47)
    assert "reset" not in events


def test_a_hostile_saved_state_is_cut_to_size():
    dev, _ = make()
    dev.restore_state({"ctr": 1 << 20, "pending_cmd": k.CMD_RESET_CPU, "buf": b"\x01" * 100, "status": "?"})

    reads = [dev.read(k.DATA_PORT_OFFSET) for _ in range(k.BUFFER_SIZE + 1)]
    assert reads == [1] * k.BUFFER_SIZE + [0]
    dev.write(k.DATA_PORT_OFFSET, 0x10)  # no command is pending: a keyboard command, acknowledged
    assert dev.read(k.DATA_PORT_OFFSET) == k.KBD_ACK
