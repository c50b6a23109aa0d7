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
