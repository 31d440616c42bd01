"""The Ray executor on a local two-CPU Ray instance: same table as local, survives a killed
worker, and finishes a run started locally."""

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from neaudit.auditing import audit
from neaudit.protection import protect

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'neaudit[ray]'")
RayExecutor = pytest.importorskip("neaudit.executors").RayExecutor

OTHER = "timm:convnext_atto?num_classes=10&input_size=64"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def release(tmp_path_factory, vit_spec) -> Path:
    out = tmp_path_factory.mktemp("ray") / "release"
    protect("builtin:samples", vit_spec, out, save_originals=True)
    return out


def _run(release, out, executor=None, **kwargs):
    return audit(release, [OTHER], suite="smoke", out=out, score="agreement", batch_size=8,
                 quiet=True, executor=executor, **kwargs)


@pytest.mark.slow  # 10 s; the default run keeps an actor's refusal
def test_ray_gives_the_local_table(cluster, release, tmp_path):
    local = _run(release, tmp_path / "local").table
    remote = _run(release, tmp_path / "ray", RayExecutor(workers=2)).table
    pd.testing.assert_frame_equal(local, remote)


@pytest.mark.slow  # 18 s of the default run's 5 minutes; the other Ray tests stay default
def test_a_killed_worker_is_replaced_without_duplicate_or_missing_rows(cluster, release,
                                                                       tmp_path):
    executor = RayExecutor(workers=2)
    out = tmp_path / "ray"
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            if executor.pids and len(list((out / "tasks").glob("*.json"))) >= 3:
                os.kill(executor.pids[0], signal.SIGKILL)
                killed.append(executor.pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    remote = _run(release, out, executor).table
    killer.join()
    assert killed, "the worker was never killed"
    local = _run(release, tmp_path / "local").table
    pd.testing.assert_frame_equal(local, remote)
    keys = remote[["model", "attack", "metric"]]
    assert not keys.duplicated().any()


@pytest.mark.slow  # 11 s; the default run keeps Ray's table and its refusals
def test_a_local_run_can_be_finished_on_ray(cluster, release, tmp_path):
    first = _run(release, tmp_path / "run", stop_after=5)
    assert first.computed_tasks == 5
    finished = _run(release, tmp_path / "run", RayExecutor(workers=2))
    assert finished.skipped_tasks == 5 and finished.summary["complete"]
    pd.testing.assert_frame_equal(finished.table, _run(release, tmp_path / "local").table)


def test_an_input_error_on_an_actor_is_the_local_one_line(cluster, release, tmp_path):
    import shutil

    from neaudit.errors import DataError

    broken = tmp_path / "release"
    shutil.copytree(release, broken)
    bad = max((broken / "protected").rglob("*.png"))
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as raised:
        _run(broken, tmp_path / "ray", RayExecutor(workers=2))
    message = str(raised.value)
    assert message.startswith(f"{bad}: cannot read this image") and "\n" not in message
    assert "ray::" not in message and "Traceback" not in message
