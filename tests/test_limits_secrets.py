"""Limits checked before a run opens, credentials never written or printed, decoding within a memory budget."""

from __future__ import annotations

import io
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import OmegaConf
from PIL import Image

from crack_runner.datasets import folder
from runner.config.redact import RedactHydraFiles, redact
from runner.config.schema import to_run_config
from runner.errors import ConfigError
from runner.track.job import JobContext, localise
from runner.track.limits import check_limits
from runner.track.tracking import flatten

PASSWORD = "pw-4f1c9e"  # a word found nowhere else in what a run writes


def limits_error(make_cfg, tmp_path: Path, *overrides: str, tiny: bool = True) -> str:
    """The ConfigError check_limits gives the composed, localised config of ``overrides``."""
    run = localise(to_run_config(make_cfg(*overrides, tiny=tiny)), JobContext(tmp_path))
    with pytest.raises(ConfigError) as caught:
        check_limits(flatten(OmegaConf.structured(run)))
    return str(caught.value)


def test_the_default_config_is_within_every_limit(make_cfg, tmp_path):
    run = localise(to_run_config(make_cfg()), JobContext(tmp_path))
    check_limits(flatten(OmegaConf.structured(run)), ["optimizer.lr=0.1"])


def test_a_300_character_name_in_dataset_path_names_key_limit_and_length(make_cfg, tmp_path):
    message = limits_error(make_cfg, tmp_path, "dataset=image_folder", f"dataset.path={tmp_path / ('a' * 300)}", tiny=False)
    assert "dataset.path" in message and "300 bytes" in message and "255 bytes (NAME_MAX)" in message


def test_a_path_longer_than_path_max_names_key_limit_and_length(make_cfg, tmp_path):
    path = tmp_path.joinpath(*["d" * 200] * 21)  # every name within NAME_MAX, the whole over PATH_MAX
    message = limits_error(make_cfg, tmp_path, "dataset=image_folder", f"dataset.path={path}", tiny=False)
    assert "dataset.path" in message and f"{len(str(path))} bytes" in message and "4095 bytes (PATH_MAX 4096" in message
    assert "NAME_MAX" not in message


def test_a_600_character_experiment_name_is_blamed_on_itself_not_on_the_uri(make_cfg, tmp_path):
    message = limits_error(make_cfg, tmp_path, f"tracking.experiment={'e' * 600}")
    assert "tracking.experiment is 600 characters" in message and "limit of 500" in message and "tracking.uri" not in message


def test_a_7000_character_value_is_refused_before_mlflow_cuts_it(make_cfg, tmp_path):
    uri = f"http://user:{PASSWORD}@tracking.example/{'a' * 7000}"
    message = limits_error(make_cfg, tmp_path, f"tracking.uri={uri}")
    logged = len(redact(uri))
    assert f"tracking.uri is {logged} characters" in message and "limit of 6000" in message and "resume=" in message
    assert PASSWORD not in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tracking.uri=http://user:secret@host:5000", "tracking.uri=http://user:***@host:5000"),
        ("https://bob:p@ss@mlflow.example/api?x=1", "https://bob:***@mlflow.example/api?x=1"),
        ("postgresql://bob:pw@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow"),
        ("['tracking.uri=http://u:pw@h', 'optimizer.lr=0.1']", "['tracking.uri=http://u:***@h', 'optimizer.lr=0.1']"),
        (r"tracking.uri=http\://u\:pw@h,optimizer.lr=0.1", r"tracking.uri=http\://u\:***@h,optimizer.lr=0.1"),  # a sweep's escaped override
        ("http://host/api?token=abc123&page=2", "http://host/api?token=***&page=2"),
        ("https://b.s3/x?X-Amz-Signature=f00d&design=1", "https://b.s3/x?X-Amz-Signature=***&design=1"),
        *[(clean, clean) for clean in ("sqlite:///mlflow.db", "http://host:5000/x?page=2", "user@example.com a=b", "http://user@host")],
    ],
)
def test_redact_hides_passwords_and_tokens_in_uris(text, expected):
    assert redact(text) == expected


def test_the_composed_logging_config_redacts_every_handler(make_cfg):
    hydra = make_cfg(return_hydra=True).hydra
    for section, handlers in (("job_logging", ("console", "file", "results")), ("hydra_logging", ("console",))):
        assert all("redact" in hydra[section].handlers[name].filters for name in handlers), section
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(get_class(hydra[section].filters.redact["()"])())
        try:
            raise ConnectionError(f"no answer from http://user:{PASSWORD}@host")
        except ConnectionError as err:
            record = logging.LogRecord("runner", logging.ERROR, __file__, 1, "tracking.uri=%s: %s", (f"http://user:{PASSWORD}@host", err), None)
            record.exc_info = (type(err), err, err.__traceback__)
        handler.handle(record)
        assert "tracking.uri=http://user:***@host" in out.getvalue() and "Traceback" in out.getvalue()
        assert PASSWORD not in out.getvalue()


def test_the_hydra_files_of_a_sweep_job_are_rewritten_redacted(tmp_path):
    job, sweep = tmp_path / "sweep" / "0", tmp_path / "sweep"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- tracking.uri=http\\://u\\:{PASSWORD}@h\n- optimizer.lr=0.1\n")
    (job / ".hydra" / "config.yaml").write_text("optimizer:\n  lr: 0.1\n")
    (sweep / "multirun.yaml").write_text(f"tracking:\n  uri: http://u:{PASSWORD}@h\n")
    config = OmegaConf.create(
        {"hydra": {"output_subdir": ".hydra", "runtime": {"output_dir": str(job)}, "mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}}}
    )
    callback = RedactHydraFiles()
    callback.on_job_start(config)
    assert (job / ".hydra" / "overrides.yaml").read_text() == "- tracking.uri=http\\://u\\:***@h\n- optimizer.lr=0.1\n"
    assert (job / ".hydra" / "config.yaml").read_text() == "optimizer:\n  lr: 0.1\n"
    assert (sweep / "multirun.yaml").read_text() == "tracking:\n  uri: http://u:***@h\n"
    failed = type("JobReturn", (), {"overrides": [f"tracking.uri=http://u:{PASSWORD}@h"]})()
    callback.on_job_end(config, failed)  # Hydra prints these when the job raised
    assert failed.overrides == ["tracking.uri=http://u:***@h"]


@pytest.mark.slow
def test_a_password_in_tracking_uri_is_neither_printed_nor_written_to_the_output_folder(cli, tmp_path):
    out = tmp_path / "out"
    result = cli(f"tracking.uri=http://user:{PASSWORD}@127.0.0.1:1", f"hydra.run.dir={out}")  # nothing listens on port 1
    assert result.returncode == 2, result.stderr[-3000:]
    assert "tracking.uri=http://user:***@127.0.0.1:1 does not answer" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    written = {path.relative_to(out).as_posix(): path.read_text() for path in out.rglob("*") if path.is_file()}
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "__main__.log"} <= set(written)
    assert not [name for name, text in written.items() if PASSWORD in text]
    assert "tracking.uri=http://user:***@127.0.0.1:1" in written[".hydra/overrides.yaml"]


def png(path: Path, width: int, height: int) -> Path:
    """An RGB gradient: compresses small, decodes to width x height x 4 bytes in PIL."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (height, 1))] * 3, axis=-1)).save(path)
    return path


def test_parallel_decodes_never_hold_more_than_the_memory_budget(tmp_path, monkeypatch):
    small = [png(tmp_path / f"{i}.png", 600, 600) for i in range(8)]
    big = png(tmp_path / "big.png", 1400, 1400)
    with Image.open(small[0]) as img:
        each = folder.decode_bytes(img, 32)
    budget = int(2.5 * each)  # two small ones at a time; the big one is over the whole budget
    held: list[tuple[int, int, int]] = []  # (bytes held by all, bytes of this decode, decodes under way), as each starts
    lock = threading.Lock()
    under_way = [0]

    class Watched(folder.MemoryBudget):
        @contextmanager
        def hold(self, nbytes: int):
            with super().hold(nbytes):
                with lock:
                    under_way[0] += 1
                    held.append((self.held, nbytes, under_way[0]))
                time.sleep(0.05)  # long enough for every other thread to ask meanwhile
                try:
                    yield
                finally:
                    with lock:
                        under_way[0] -= 1

    monkeypatch.setattr(folder, "CHUNK", 1)  # one file per task: every thread gets some
    monkeypatch.setattr(folder, "decode_memory_budget", lambda: budget)
    monkeypatch.setattr(folder, "MemoryBudget", Watched)
    paths = [*small[:4], big, *small[4:]]
    out = np.zeros((len(paths), 32, 32, 3), np.uint8)
    ok, skipped = folder.decode_into(paths, 32, out, workers=4, progress=False)
    assert ok.tolist() == list(range(len(paths))) and not skipped
    assert len(held) == len(paths)
    assert all(total <= budget for total, nbytes, _ in held if nbytes <= budget)
    (alone,) = [(total, count) for total, nbytes, count in held if nbytes > budget]
    assert alone[0] > budget and alone[1] == 1  # decoded, alone
    assert max(count for _, _, count in held) == 2  # the budget, not the 4 threads, decides
    assert np.array_equal(out[4], folder.decode_image(big, 32))


def test_a_closed_budget_lets_no_waiting_decode_in():
    budget = folder.MemoryBudget(10)
    outcome: list[str] = []

    def ask() -> None:
        try:
            with budget.hold(5):
                outcome.append("decoded")
        except folder.BudgetClosed:
            outcome.append("gave up")

    with budget.hold(10):
        waiting = threading.Thread(target=ask)
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive() and not outcome  # no room: it waits
        budget.close()  # the decode stopped
        waiting.join(5)
        assert outcome == ["gave up"]


def test_an_image_over_the_decompression_bomb_limit_is_skipped_not_just_warned_about(tmp_path, monkeypatch):
    over = png(tmp_path / "over.png", 50, 40)  # 2,000 pixels: over the limit, under twice it (where PIL only warns)
    fine = png(tmp_path / "fine.png", 30, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    out = np.zeros((2, 32, 32, 3), np.uint8)
    ok, skipped = folder.decode_into([over, fine], 32, out, progress=False)
    assert ok.tolist() == [1]
    (note,) = skipped
    assert note.startswith(str(over)) and "DecompressionBombError" in note and "2000 pixels" in note and "1500" in note
