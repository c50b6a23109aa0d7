from __future__ import annotations

from vcpu_worker import serial as s


class Sink:
    def __init__(self) -> None:
        self.out = bytearray()
        self.irqs = 0

    def write(self, data: bytes) -> None:
        self.out += data

    def irq(self) -> None:
        self.irqs += 1


def make() -> tuple[s.Serial8250, Sink]:
    sink = Sink()
    return s.Serial8250(sink.write, sink.irq), sink


def test_written_bytes_reach_the_output():
    uart, sink = make()

    for b in b"hi":
        uart.write(s.DATA, b)

    assert sink.out == b"hi"


def test_lsr_reports_transmitter_empty_and_data_ready():
    uart, _ = make()
    assert uart.read(s.LSR) & (s.LSR_THRE | s.LSR_TEMT | s.LSR_DR) == s.LSR_THRE | s.LSR_TEMT

    uart.enqueue_input(b"x")

    assert uart.read(s.LSR) & s.LSR_DR


def test_input_is_read_in_order():
    uart, _ = make()
    uart.enqueue_input(b"ab")

    assert (uart.read(s.DATA), uart.read(s.DATA)) == (ord("a"), ord("b"))


def test_enabling_thre_interrupt_raises_irq_and_iir_names_it_once():
    uart, sink = make()

    uart.write(s.IER, s.IER_THRE)

    assert sink.irqs == 1
    assert uart.read(s.IIR_FCR) & 0x0F == s.IIR_THRE
    assert uart.read(s.IIR_FCR) & 0x0F == s.IIR_NONE


def test_each_transmitted_byte_raises_thre_interrupt_when_enabled():
    uart, sink = make()
    uart.write(s.IER, s.IER_THRE)

    uart.write(s.DATA, ord("a"))

    assert sink.irqs == 2


def test_received_data_interrupt_when_enabled():
    uart, sink = make()
    uart.write(s.IER, s.IER_RDA)

    uart.enqueue_input(b"k")

    assert sink.irqs == 1
    assert uart.read(s.IIR_FCR) & 0x0F == s.IIR_RDA


def test_rx_fifo_is_bounded():
    uart, _ = make()

    taken = uart.enqueue_input(bytes(200))

    assert taken == s.RX_FIFO_SIZE
    assert uart.rx_room() == 0


def test_a_full_fifo_reports_room_once_when_the_guest_reads_or_clears_it():
    rooms: list[int] = []
    uart = s.Serial8250(lambda _: None, lambda: None, lambda: rooms.append(uart.rx_room()))
    uart.enqueue_input(b"ab")
    uart.read(s.DATA)
    assert rooms == [], "a FIFO that was not full does not report"

    uart.enqueue_input(bytes(200))
    uart.read(s.DATA)
    uart.read(s.DATA)
    assert rooms == [1], "only the read that freed a full FIFO reports"

    uart.enqueue_input(bytes(200))
    uart.write(s.IIR_FCR, 0x02)  # clear the receive FIFO
    assert rooms == [1, s.RX_FIFO_SIZE]


def test_divisor_latch_does_not_transmit():
    uart, sink = make()
    uart.write(s.LCR, s.LCR_DLAB)

    uart.write(s.DATA, 0x01)

    assert sink.out == b""
    assert uart.read(s.DATA) == 0x01


def test_loopback_mode_mirrors_modem_control_as_linux_probes_it():
    uart, sink = make()

    uart.write(s.MCR, s.MCR_LOOP | 0x0A)  # OUT2 | RTS

    assert uart.read(s.MSR) & 0xF0 == 0x90  # DCD | CTS
    uart.write(s.DATA, 0x55)
    assert sink.out == b""
    assert uart.read(s.DATA) == 0x55


def test_a_snapshot_of_the_registers_restores_them_in_a_new_uart():
    uart, _ = make()
    uart.write(s.LCR, s.LCR_DLAB | 0x03)
    uart.write(s.DATA, 0x01)  # divisor latch: 115200 baud
    uart.write(s.IER, 0x00)
    uart.write(s.LCR, 0x03)
    uart.write(s.IER, s.IER_RDA | s.IER_THRE)
    uart.write(s.MCR, 0x0B)
    uart.write(s.SCR, 0x5A)
    uart.enqueue_input(b"ab")

    restored, sink = make()
    restored.restore_state(uart.save_state())
    assert sink.irqs == 0  # restoring raises nothing: the interrupt controller's state has its own

    assert (restored.read(s.IER), restored.read(s.LCR), restored.read(s.MCR), restored.read(s.SCR)) == (
        s.IER_RDA | s.IER_THRE,
        0x03,
        0x0B,
        0x5A,
    )
    restored.write(s.LCR, s.LCR_DLAB | 0x03)
    assert (restored.read(s.DATA), restored.read(s.IER)) == (0x01, 0x00)
    restored.write(s.LCR, 0x03)
    assert bytes([restored.read(s.DATA), restored.read(s.DATA)]) == b"ab"


def test_a_restored_uart_keeps_the_drivers_thre_interrupt_going():
    # Linux caches IER and enables THRE only when it is off in its cache: a restored UART
    # with IER back at 0 would take the bytes but never interrupt, and output would stop.
    uart, _ = make()
    uart.write(s.IER, s.IER_THRE)
    restored, sink = make()
    restored.restore_state(uart.save_state())

    restored.write(s.DATA, ord("x"))

    assert sink.out == b"x" and sink.irqs == 1
    assert restored.read(s.IIR_FCR) & 0x0F == s.IIR_THRE


def test_a_hostile_saved_state_is_cut_to_the_registers_widths_and_the_fifos_size():
    uart, _ = make()
    uart.restore_state({"ier": 0x1FF, "lcr": "x", "scr": -1, "rx": b"z" * 1000, "dll": 1 << 40})

    assert uart.read(s.IER) == 0x0F and uart.read(s.LCR) == 0x03 and uart.read(s.SCR) == 0xFF
    assert uart.rx_room() == 0
    uart.write(s.LCR, s.LCR_DLAB)
    assert uart.read(s.DATA) == 0


def test_a_saved_state_that_is_not_a_map_is_refused():
    uart, _ = make()
    try:
        uart.restore_state([1, 2])
    except ValueError as e:
        assert "serial" in str(e)
    else:
        raise AssertionError("a list was taken as the UART's state")
