"""/balloon and /balloon/statistics: Firecracker's semantics before and after boot."""

from __future__ import annotations

from controlplane.balloon import BalloonReport, BalloonView, statistics
from controlplane.state import NOT_SUPPORTED_PRE_BOOT
from devices.balloon.messages import BalloonStatus
from tests.support.api_client import assert_no_content, fault
from tests.unit.controlplane.test_api_state import configure, start

BODY = {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 1}


def test_put_balloon_reaches_the_spec_and_the_config(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json=BODY))
    assert api.client.get("/balloon").json() == BODY
    assert api.client.get("/vm/config").json()["balloon"] == BODY
    start(api)
    assert api.vm.spec.balloon == {**BODY, "free_page_reporting": False}


def test_get_balloon_without_one_says_so(api):
    assert fault(api.client.get("/balloon")) == "Balloon config error: No balloon device found."


def test_put_balloon_needs_its_required_fields_and_a_sane_size(api, files):
    configure(api, files)
    assert "missing field `deflate_on_oom`" in fault(api.client.put("/balloon", json={"amount_mib": 1}))
    too_big = {"amount_mib": 1 << 20, "deflate_on_oom": False}
    assert (
        fault(api.client.put("/balloon", json=too_big))
        == "Balloon config error: Amount of pages requested is too large."
    )
    assert "amount_mib" in fault(api.client.put("/balloon", json={"amount_mib": -1, "deflate_on_oom": False}))


def test_free_page_reporting_is_off_unless_asked_and_shown_only_when_on(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json={**BODY, "free_page_reporting": True}))
    assert api.client.get("/balloon").json()["free_page_reporting"] is True


def test_patch_balloon_is_post_boot_and_forwarded(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json=BODY))
    assert fault(api.client.patch("/balloon", json={"amount_mib": 10})) == NOT_SUPPORTED_PRE_BOOT
    start(api)
    assert_no_content(api.client.patch("/balloon", json={"amount_mib": 10}))
    assert api.vm.updates[-1] == ("balloon", "balloon", {"amount_mib": 10})
    assert api.client.get("/balloon").json()["amount_mib"] == 10
    assert "too large" in fault(api.client.patch("/balloon", json={"amount_mib": 1 << 20}))
    assert fault(api.client.put("/balloon", json=BODY)).startswith("The requested operation is not supported after")


def test_a_worker_refusal_is_a_400_and_the_target_is_unchanged(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json=BODY))
    start(api)
    api.vm.refuse_updates = "Device is inactive, check if balloon driver is enabled in guest kernel."
    assert "Device is inactive" in fault(api.client.patch("/balloon", json={"amount_mib": 3}))
    assert api.client.get("/balloon").json()["amount_mib"] == 64


def test_statistics_cannot_be_turned_on_or_off_after_boot(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json=BODY))
    start(api)
    message = "Balloon config error: Cannot enable/disable the statistics after boot."
    assert fault(api.client.patch("/balloon/statistics", json={"stats_polling_interval_s": 0})) == message
    assert_no_content(api.client.patch("/balloon/statistics", json={"stats_polling_interval_s": 5}))
    assert api.vm.updates[-1] == ("balloon", "balloon", {"stats_polling_interval_s": 5})
    assert api.client.get("/balloon").json()["stats_polling_interval_s"] == 5


def test_statistics_disabled_at_boot_stay_disabled(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json={"amount_mib": 0, "deflate_on_oom": False}))
    start(api)
    message = "Balloon config error: Cannot enable/disable the statistics after boot."
    assert fault(api.client.patch("/balloon/statistics", json={"stats_polling_interval_s": 1})) == message
    assert "not enabled" in fault(api.client.get("/balloon/statistics"))


def test_get_statistics_reports_target_actual_and_the_guests_numbers(api, files):
    configure(api, files)
    assert_no_content(api.client.put("/balloon", json=BODY))
    assert fault(api.client.get("/balloon/statistics")) == NOT_SUPPORTED_PRE_BOOT
    start(api)
    api.vm.balloon = BalloonReport(4096, {"free_memory": 7, "total_memory": 9})
    assert api.client.get("/balloon/statistics").json() == {
        "target_pages": 64 * 256,
        "actual_pages": 4096,
        "target_mib": 64,
        "actual_mib": 16,
        "free_memory": 7,
        "total_memory": 9,
    }


def test_hostile_status_values_are_dropped_and_counted():
    view = BalloonView()
    view.accept(BalloonStatus(1 << 40, {"free_memory": 5, "evil": 1, "swap_in": -3}))
    assert view.report == BalloonReport(0, {"free_memory": 5}) and view.rejected == 3
    view.accept(BalloonStatus(7, {f"k{i}": 1 for i in range(1000)}))
    assert view.report.actual_pages == 7 and view.report.stats == {} and view.rejected == 3 + 1000
    assert statistics(1, view.report)["actual_mib"] == 0


def test_config_file_balloon_section_is_applied(api, files):
    from controlplane.cli import apply_config_file

    configure(api, files)
    path = api.tmp / "vm.json"
    import json

    path.write_text(
        json.dumps({"boot-source": {"kernel_image_path": files["vmlinux"]}, "balloon": BODY, "entropy": {}})
    )
    apply_config_file(api.vmm, str(path))
    assert api.client.get("/balloon").json() == BODY
