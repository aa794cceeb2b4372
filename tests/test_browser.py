"""The review command in a real browser. A seconds-long smoke search runs; `run_tune.py --review` is started
on its folder while it runs; headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium through /usr/bin/chromedriver: nothing is downloaded) reads what each dashboard shows: the Ray
dashboard past its token prompt with the training workers in its Actors view while the search runs, then,
once it has finished, optuna-dashboard (trial numbers and states, parameter names, the objective's name,
the user attributes) and TensorBoard (every trial's val_w_robust curve). Screenshots go to the test's
folder, and to docs/ with BMTARD_SCREENSHOTS=docs (how the README's were taken).

.ci/run installs the browser and sets BMTARD_REQUIRE_BROWSER=1, so that there a missing browser fails the
test instead of skipping it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from test_review import start_review, stop_review, url_of
from test_tune import cli_env, smoke_args

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,860")
PAGE_TIMEOUT_S = 90


def need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dashboard,test]')")
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("BMTARD_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):  # a fresh profile every run
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver: object) -> str:
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the page is being replaced: nothing to read yet
        return ""


def wait_for(driver: object, texts: list[str], shots: Path, name: str, timeout_s: float = PAGE_TIMEOUT_S) -> str:
    """Wait until the rendered page shows every one of ``texts``; returns the page's text."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = page_text(driver)
        missing = [t for t in texts if t not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            driver.save_screenshot(str(shots / f"{name}-timeout.png"))  # type: ignore[attr-defined]
            pytest.fail(f"{name}: the page never showed {missing}; it shows:\n{text[:2000]}")
        time.sleep(1.0)


def scroll_to(driver: object, text: str) -> None:
    """Bring the first element whose own text holds ``text`` to the top of the window (for the screenshots);
    nothing when no element does."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.XPATH, f"//*[contains(text(), '{text}')]")  # type: ignore[attr-defined]
    if found:
        driver.execute_script("arguments[0].scrollIntoView(true);", found[0])  # type: ignore[attr-defined]
        time.sleep(1.0)


def screenshot(driver: object, shots: Path, name: str) -> Path:
    """A PNG of the page, palette-reduced to stay small; also into $BMTARD_SCREENSHOTS (docs/) when set."""
    from PIL import Image

    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
    target = os.environ.get("BMTARD_SCREENSHOTS")
    if target:
        folder = Path(target) if Path(target).is_absolute() else REPO / target
        folder.mkdir(parents=True, exist_ok=True)
        (folder / path.name).write_bytes(path.read_bytes())
    return path


def trials_started(exp: Path) -> bool:
    """The search is under way: its study exists and a trial has reported an epoch."""
    return (exp / "optuna.db").is_file() and (exp / "ray_cluster.json").is_file() and any(
        p.stat().st_size > 0 for p in exp.glob("trial_*/progress.csv"))


def auth_token() -> str:
    """The cluster's token, as the README tells a user to get it (never printed)."""
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.run([str(ray_bin), "get-auth-token"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
def test_review_a_running_then_finished_search_in_chromium(tmp_path: Path, cifar_root: Path, browser: object) -> None:
    from selenium.webdriver.common.by import By

    start = time.monotonic()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    exp = tmp_path / "runs" / "smoke"
    log = open(tmp_path / "search.log", "w")  # noqa: SIM115 - the search writes to it until it ends
    # 8 trials, not the smoke test's 4: the search (and its Ray dashboard) must outlive the Ray pages' checks
    # (with 4, a fresh clone's run once finished before the Train API page loaded: connection refused).
    search = subprocess.Popen(smoke_args(tmp_path, cifar_root, "--num-cpus", "2", "--num-samples", "8"),
                              env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    review = None
    try:
        deadline = time.monotonic() + 900
        while not trials_started(exp):
            assert search.poll() is None, (tmp_path / "search.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial reported an epoch"
            time.sleep(1)
        review, out = start_review(exp)
        study_url, tb_url, ray_url = (url_of(out, name) for name in ("Optuna study", "TensorBoard", "Ray dashboard"))
        assert ray_url == json.loads((exp / "ray_cluster.json").read_text())["dashboard_url"]  # the search's own
        token = auth_token()
        assert "ray get-auth-token" in out and token not in out
        # It names the search's own cluster only after checking its identity (session name, GCS address).
        assert "the search's own cluster (session" in out or "cannot be verified as the search's cluster" in out, out

        # The Ray dashboard while trials run: its token prompt, then the training workers in the Actors view.
        browser.get(ray_url)  # type: ignore[attr-defined]
        wait_for(browser, ["Authentication Token Required"], shots, "ray-prompt")
        browser.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(token)  # type: ignore[attr-defined]
        next(b for b in browser.find_elements(By.TAG_NAME, "button")  # type: ignore[attr-defined]
             if b.text.strip().upper() == "SUBMIT").click()
        browser.set_window_size(1600, 760)  # wide enough for the actors' IP and node columns
        browser.get(f"{ray_url}/#/actors")  # type: ignore[attr-defined]
        wait_for(browser, ["Actors", "Class"], shots, "ray-actors")
        label = next(el for el in browser.find_elements(By.TAG_NAME, "label")  # type: ignore[attr-defined]
                     if el.text.strip() == "Class")
        field = browser.find_element(By.ID, label.get_attribute("for"))  # type: ignore[attr-defined]
        field.send_keys("RayTrainWorker")
        text = wait_for(browser, ["RayTrainWorker", "ALIVE", "IP", "Node ID"], shots, "ray-actors")
        assert "Authentication Token Required" not in text
        screenshot(browser, shots, "review-ray-actors")
        # Ray Train's own state, as JSON (Ray 2.60's dashboard has no Train page; /api/train/v2/runs/v1 is
        # Train V2's, the trials' runs under their trial ids).
        browser.get(f"{ray_url}/api/train/v2/runs/v1")  # type: ignore[attr-defined]
        text = wait_for(browser, ['"train_runs"', '"world_rank"', '"node_ip"'], shots, "ray-train-api")
        assert any(p.name.removeprefix("trial_") in text for p in exp.glob("trial_*")), text[:1000]
        browser.set_window_size(1280, 860)

        assert search.wait(timeout=900) == 0, (tmp_path / "search.log").read_text()[-4000:]
        study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{exp / 'optuna.db'}")
        states = sorted({t.state.name.capitalize() for t in study.trials})  # Complete, and Pruned if ASHA stopped one
        assert set(states) <= {"Complete", "Pruned"}, states
        chosen = study.user_attrs["selected_trial"]
        stop_review(review, [study_url, tb_url])
        # --review on the finished search: its cluster has ended, and --review says so rather than send the user
        # to whatever listens on that port now; the importance panel's basis is flagged (8 trials < 10).
        review, out = start_review(exp)
        study_url, tb_url = (url_of(out, name) for name in ("Optuna study", "TensorBoard"))
        assert "has ended" in out and "Ray dashboard:  http" not in out, out
        assert "importance" in out, out

        # optuna-dashboard, now that the search has finished (the same server, reading the live database).
        browser.get(study_url)  # type: ignore[attr-defined]
        # The study page answers the four questions: which trial is best, whether it beats the runner-up beyond
        # the validation noise, whether its balance reached its target, and where its run is.
        wait_for(browser, ["smoke", "val_w_robust", "Best Trial", "Study User Attributes", "preset", "smoke-search",
                           "selected_trial", "versus_runner_up", chosen["versus_runner_up"].split(":")[0],
                           "balance", chosen["balance"].split(":")[0], "run_folder", Path(chosen["run_folder"]).name,
                           "test_w_robust", "Intermediate values", "optim.lr"], shots, "optuna-study")
        browser.set_window_size(1280, 1400)  # type: ignore[attr-defined]
        scroll_to(browser, "Study User Attributes")  # the selected trial and the answers about it
        screenshot(browser, shots, "review-optuna-study")
        # The selected trial's own page: its outcome and its balance as user attributes.
        browser.get(f"{study_url}/trials?numbers={chosen['number']}")  # type: ignore[attr-defined]
        params = ["ebb.target_entropy", "ebb.eta_tau", "nlb.rho", "optim.lr"]
        wait_for(browser, [f"Trial {t.number}" for t in study.trials] + [*states, "Intermediate Values",
                 "ray_trial_id", "run_folder", "val_w_robust_se", "tau_adv_at_bound", "H_target", "H_adv", *params],
                 shots, "optuna-trials")
        scroll_to(browser, "(trial_id=")  # the selected trial's header
        screenshot(browser, shots, "review-optuna-trials")  # its header and its balance attributes, in one view

        # TensorBoard: the runs named by Optuna number then Ray id; the custom layout puts the teachers'
        # entropies beside the target they aim at (smoothing off).
        runs = [p.name for p in (exp / "tensorboard").iterdir()]
        assert sorted(runs) == sorted(f"{t.number:03d}_{t.user_attrs['ray_trial_id']}" for t in study.trials)
        browser.get(f"{tb_url}#scalars&_smoothingWeight=0&tagFilter=val_w_robust")  # type: ignore[attr-defined]
        wait_for(browser, ["validation/val_w_robust", *runs], shots, "tensorboard")
        best_run = f"{chosen['number']:03d}_{chosen['ray_trial_id']}"
        browser.get(f"{tb_url}#custom_scalars&_smoothingWeight=0&regexInput={best_run}")  # type: ignore[attr-defined]
        wait_for(browser, ["balance against its target", "teacher entropies and the target (nats)"], shots,
                 "tensorboard-custom")
        time.sleep(3)  # the charts draw after their titles
        scroll_to(browser, "balance against its target")
        screenshot(browser, shots, "review-tensorboard")
        browser.set_window_size(1280, 860)  # type: ignore[attr-defined]

        stop_review(review, [study_url, tb_url])  # Ctrl-C: both servers stop, their ports close
    finally:
        for proc in (search, review):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the search saves its state and stops its Ray; --review its servers
                try:
                    proc.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()
    print(f"browser test: {time.monotonic() - start:.0f} s; screenshots in {shots}")
