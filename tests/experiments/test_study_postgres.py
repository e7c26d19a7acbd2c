"""Many workers on one study in a real PostgreSQL server; one is killed with SIGKILL mid-trial.

A throwaway server is started from Debian's ``postgresql`` package (``.ci/run`` installs it when absent) in
a temporary directory; without one the test is skipped with the reason. ``MIXERLAB_TEST_POSTGRES`` (a URL)
points the test at an existing server instead.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'mixerlab[postgres]')")
    if os.environ.get("MIXERLAB_TEST_POSTGRES"):
        yield os.environ["MIXERLAB_TEST_POSTGRES"]
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql; .ci/run does this)")
    bindir = Path(initdb).parent
    data = Path(tempfile.mkdtemp(prefix="mixerlab-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(data, user="postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    try:
        subprocess.run([*as_user, str(initdb), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"), "-w",
                        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {exc} {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def _new_database(url: str) -> str:
    import psycopg

    name = f"study_{uuid.uuid4().hex[:8]}"
    con = psycopg.connect(url)
    con.autocommit = True
    con.cursor().execute(f"CREATE DATABASE {name}")
    con.close()
    return url.rsplit("/", 1)[0] + "/" + name


RECIPE = """
name = "pg"
objectives = ["val_bpb"]
sampler = { kind = "grid" }
[space]
"train.seed" = [0, 1, 2, 3, 4, 5]
[base.model]
d_model = 16
n_layers = 1
n_heads = 2
mlp = "none"
positions = "none"
[base.train]
steps = 60
batch_size = 2
seq_len = 16
eval_interval = 6
eval_batches = 1
warmup_steps = 1
[base.data]
corpus = "stdlib"
[trial]
threads = 1
timeout_s = 300
"""


def test_three_workers_one_killed(postgres_url, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from experiments.study import read_trial, retried_trial

    url = _new_database(postgres_url)
    recipe = tmp_path / "pg.toml"
    recipe.write_text(RECIPE)
    common = [str(recipe), "--storage", url, "--heartbeat", "1", "--no-progress"]
    py = [sys.executable, "-m", "experiments", "study"]
    logs = [open(tmp_path / f"w{i}.log", "w") for i in range(3)]  # noqa: SIM115 — closed below
    first = subprocess.Popen([*py, "run", *common, "--out", str(tmp_path / "w0")], stdout=logs[0], stderr=logs[0])
    storage = optuna.storages.RDBStorage(url)
    deadline = time.time() + 120
    while time.time() < deadline:  # the coordinator creates the study and enqueues the grid
        try:
            study = optuna.load_study(study_name="pg-cpu", storage=storage)
            if len(study.get_trials(deepcopy=False)) == 6:
                break
        except KeyError:
            pass
        time.sleep(0.5)
    workers = [subprocess.Popen([*py, "worker", *common, "--out", str(tmp_path / f"w{i}")], stdout=logs[i],
                                stderr=logs[i]) for i in (1, 2)]
    victim = workers[1]
    victim_trial = None
    deadline = time.time() + 180
    while time.time() < deadline and victim_trial is None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}"):
                victim_trial = t.number
        time.sleep(0.2)
    assert victim_trial is not None, "the victim worker never started a trial"
    completed_before = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    for proc in (first, workers[0]):
        proc.wait(timeout=400)
    for log in logs:
        log.close()
    assert first.returncode == 0, (tmp_path / "w0.log").read_text()[-2000:]
    assert workers[0].returncode == 0, (tmp_path / "w1.log").read_text()[-2000:]

    trials = optuna.load_study(study_name="pg-cpu", storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "a trial number is duplicated"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == [0, 1, 2, 3, 4, 5], "budget not completed once"
    killed = trials[victim_trial]
    assert killed.state == TrialState.FAIL
    # found dead either by its stale heartbeat (Optuna's callback queues the retry) or, on this host, by its PID
    # (the study queues it): whichever worker looks first; `retried_trial` reads both
    retries = [t for t in complete if retried_trial(t) == victim_trial]
    assert len(retries) == 1 and retries[0].params == killed.params
    for number, value in completed_before.items():
        assert trials[number].state == TrialState.COMPLETE and trials[number].value == value
    workers_seen = {t.user_attrs["worker"] for t in complete}
    assert len(workers_seen) >= 2, f"work was not shared: {workers_seen}"
    assert all(read_trial(t).summary.status == "completed" for t in complete)
