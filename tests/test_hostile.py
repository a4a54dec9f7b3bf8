"""Hostile and damaged input (issue 13): shared run directories never run code, and every
expected failure is one line on stderr, exit code 2, with nothing half-written.

Most cases call the CLI's ``main`` in this process (``invoke``): the same code path as the
``coqat`` command, at a fraction of a subprocess's start-up cost. A few run the real command.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from coqat.rundir import CHECKPOINT
from conftest import DIGITS, LM_MICRO, assert_one_line_error, run_cli, train_run

pytestmark = pytest.mark.filterwarnings("ignore")

PAYLOAD = '''
import pathlib
pathlib.Path({sentinel!r}).write_text("the payload ran")
{body}
'''


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    """``coqat ARGS`` in this process: (exit code, stdout, stderr)."""
    from coqat.cli import main

    old = sys.argv
    sys.argv = ["coqat", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    code, out, err = result
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, (code, out[-1500:], err[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One short finished digits run (QAT w4a4), copied by the tests that damage it."""
    run, _ = train_run(DIGITS, tmp_path_factory.mktemp("runs"), bits="w4a4", steps=6)
    return run.path


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ----- 1. a run directory must never run code ----------------------------------------------------
def _plant_payload(run: Path, tmp_path: Path) -> Path:
    """Make the run's config name a workload in a .py file shipped beside it."""
    sentinel = tmp_path / "PWNED"
    evil = run / "evil.py"
    evil.write_text(PAYLOAD.format(sentinel=str(sentinel), body="class Payload: pass"))
    _edit_json(run / "config.json",
               lambda d: d["space"]["workload"].update(name=f"{evil}:Payload"))
    return sentinel


@pytest.mark.parametrize("command", [["export", "{run}", "--format", "json"],
                                     ["deploy", "{run}"],
                                     ["train", "--resume", "{run}"]])
def test_a_shared_run_directory_that_names_code_runs_nothing(capsys, finished_run, tmp_path,
                                                             command):
    run = _copy(finished_run, tmp_path)
    if command[0] == "train":
        (run / "final.json").unlink()           # an unfinished run, so resume would start
    sentinel = _plant_payload(run, tmp_path)
    args = [a.format(run=run) for a in command]
    one_line_error(invoke(capsys, *args), "names code to import")
    assert not sentinel.exists()


def test_a_sweep_manifest_that_names_code_runs_nothing(capsys, tmp_path):
    from coqat.sweep import frontier as fr

    study, manifest, sweep = fr.create_or_resume(DIGITS, ["w4a4"], [0], ["uniform"],
                                                 str(tmp_path / "s.journal"), tmp_path, "evil")
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "evil.py"
    evil.write_text(PAYLOAD.format(sentinel=str(sentinel), body="class W: pass"))
    manifest.space["workload"]["name"] = f"{evil}:W"
    study.set_user_attr(fr.MANIFEST_ATTR, manifest.to_json())
    capsys.readouterr()
    one_line_error(invoke(capsys, "worker", "--storage", str(tmp_path / "s.journal"),
                          "--study", "evil", "--out", str(tmp_path)), "names code to import")
    assert not sentinel.exists()


# ----- 3. user text is printed literally ---------------------------------------------------------
def test_markup_in_user_text_is_printed_literally(capsys, tmp_path):
    space = tmp_path / "[red]sp[bold].toml"
    space.write_text(Path(DIGITS).read_text().replace("steps = 40", 'steps = "[/x]"'))
    msg = one_line_error(invoke(capsys, "bops", "--space", str(space)), "[train]", "[/x]",
                         "[red]sp[bold]")
    assert "steps must be a positive integer" in msg


@pytest.mark.parametrize("edit, table", [
    (lambda t: t.replace('[workload]\nname = "digits"', '[workload]\nnom = "digits"'),
     "[workload]"),
    (lambda t: t.replace("w_bits = [2, 4, 8]", "w_bits = [2, 7]"), "[[search.layers]]"),
    (lambda t: t + '\n[search.pinned]\n"conv1" = "w9a9"\n', "[search.pinned]"),
])
def test_messages_keep_the_toml_table_they_name(capsys, tmp_path, edit, table):
    space = tmp_path / "space.toml"
    space.write_text(edit(Path(DIGITS).read_text()))
    one_line_error(invoke(capsys, "bops", "--space", str(space)), table)


# ----- 4. OS errors on the output ----------------------------------------------------------------
def test_disk_full_while_writing_the_run_header_leaves_nothing(capsys, tmp_path, monkeypatch):
    import coqat.util

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(coqat.util.os, "fsync", full)
    out = tmp_path / "runs"
    msg = one_line_error(invoke(capsys, "train", "--space", DIGITS, "--steps", "2", "--out",
                                str(out), "-q"), "no space left")
    assert "--out" in msg
    assert not out.exists() or not any(out.iterdir())        # no empty run directory


def test_disk_full_while_logging_metrics_is_one_line(capsys, tmp_path, monkeypatch):
    from coqat.rundir import RunDir

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "metrics.jsonl"))

    monkeypatch.setattr(RunDir, "log", full)
    one_line_error(invoke(capsys, "train", "--space", DIGITS, "--steps", "6", "--out",
                          str(tmp_path / "runs"), "-q"), "no space left", "metrics.jsonl")


def test_read_only_output_directory(capsys, tmp_path, monkeypatch):
    import coqat.rundir

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(coqat.rundir.Path, "mkdir", read_only)
    one_line_error(invoke(capsys, "train", "--space", DIGITS, "--out", str(tmp_path / "ro"),
                          "-q"), "read-only")


# ----- 5. damaged run directories ------------------------------------------------------------------
def _damage(kind: str, run: Path) -> None:
    cfg, final = run / "config.json", run / "final.json"
    if kind == "config-not-utf8":
        cfg.write_bytes(b"\xff\xfe{not utf-8")
    elif kind == "config-a-list":
        cfg.write_text("[1, 2, 3]")
    elif kind == "config-missing-space":
        _edit_json(cfg, lambda d: d.pop("space"))
    elif kind == "config-unknown-setting":
        _edit_json(cfg, lambda d: d["settings"].update(bogus=1))
    elif kind == "config-bad-setting":
        _edit_json(cfg, lambda d: d["settings"].update(lr="fast"))
    elif kind == "final-damaged":
        final.write_text('{"metric_name": "val_acc", "metric": "x"')
    elif kind == "final-a-list":
        final.write_text("[]")
    elif kind == "bitconfig-nested":
        (run / "bitconfig.json").write_text("[" * 100000 + "]" * 100000)


@pytest.mark.parametrize("kind", ["config-not-utf8", "config-a-list", "config-missing-space",
                                  "config-unknown-setting", "config-bad-setting",
                                  "final-damaged", "final-a-list", "bitconfig-nested"])
def test_damaged_run_files_are_one_line_errors(capsys, finished_run, tmp_path, kind):
    run = _copy(finished_run, tmp_path)
    _damage(kind, run)
    command = ["report", str(run), "--no-html"] if kind.startswith("final") else \
        ["export", str(run), "--format", "json"]
    one_line_error(invoke(capsys, *command), str(run.name))


def test_damaged_metrics_lines_are_skipped_by_the_report(capsys, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe{"kind": "train", "st\n{"kind": "tr')
    code, out, err = invoke(capsys, "report", str(run), "--out", str(tmp_path / "r"))
    assert code == 0, err


def test_a_checkpoint_that_is_a_directory_is_a_one_line_error(capsys, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / "final.json").unlink()
    (run / CHECKPOINT).unlink()
    (run / CHECKPOINT).mkdir()
    one_line_error(invoke(capsys, "train", "--resume", str(run)), "not a file")


# ----- 6. validation gaps ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--device", "tpu"], "device must be"),
    (["--seed", str(2**70)], "seed must be"),
    (["--seed", "-1"], "seed must be"),
    (["--lr", "inf"], "lr must be a finite"),
    (["--lr", "nan"], "lr must be a finite"),
    (["--steps", "0"], "steps must be a positive"),
    (["--qat-fraction", "1.5"], "qat_fraction"),
    (["--kernels", "fast"], "kernels must be"),
])
def test_bad_options_fail_before_any_run_directory(capsys, tmp_path, args, needle):
    out = tmp_path / "runs"
    one_line_error(invoke(capsys, "train", "--space", DIGITS, "--out", str(out), *args), needle)
    assert not out.exists()


def test_cuda_without_a_gpu_fails_before_any_run_directory(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "runs"
    one_line_error(invoke(capsys, "train", "--space", DIGITS, "--device", "cuda", "--out",
                          str(out)), "no CUDA GPU")
    assert not out.exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace('[[search.layers]]\npattern = "model.layers.*"\n'
                         'w_bits = [2, 3, 4, 6, 8]\na_bits = [4, 6, 8]', "[search]\nlayers = 5"),
     "array of tables"),
    (lambda t: t.replace("ffn_hidden = 64", "ffn_hidden = 1000000000000"), "parameters"),
    (lambda t: t.replace('name = "lm-micro"', 'name = "../escape"'), "name"),
    (lambda t: t.replace('[search.pinned]\n"lm_head" = "w16a16"', "").replace(
        "[[search.layers]]", "[search]\npinned = 3\n\n[[search.layers]]"), "[search.pinned]"),
    (lambda t: t.replace("lr = 3e-3", 'lr = "fast"'), "lr must be"),
])
def test_malformed_space_values_are_one_line_errors(capsys, tmp_path, edit, needle):
    space = tmp_path / "space.toml"
    space.write_text(edit(Path(LM_MICRO).read_text()))
    one_line_error(invoke(capsys, "bops", "--space", str(space)), needle)


def test_a_budget_whose_product_overflows_is_refused(capsys, tmp_path):
    one_line_error(invoke(capsys, "search", "--space", LM_MICRO, "--budget",
                          "*".join(["1e30"] * 12), "--out", str(tmp_path)), "beyond any model")


@pytest.mark.parametrize("scale", ["nan", "0", "-1", "inf"])
def test_frontier_steps_scale_must_be_a_positive_number(capsys, tmp_path, scale):
    one_line_error(invoke(capsys, "frontier", "--space", DIGITS, "--budgets", "w4a4",
                          "--steps-scale", scale, "--out", str(tmp_path)), "steps-scale")
    assert not any(tmp_path.iterdir())


def test_a_missing_optional_dependency_names_the_extra(capsys, finished_run, tmp_path,
                                                       monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *a, **k):
        if name == "onnx" or name.startswith("onnx."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    for mod in [m for m in sys.modules if m == "onnx" or m.startswith("onnx.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.delitem(sys.modules, "coqat.exporters.onnx_export", raising=False)
    run = _copy(finished_run, tmp_path)
    one_line_error(invoke(capsys, "export", str(run), "--format", "onnx"), "coqat[export]")


# ----- 7. smaller ones ---------------------------------------------------------------------------------
def test_a_storage_password_is_never_printed(capsys, tmp_path):
    msg = one_line_error(invoke(capsys, "frontier", "--space", DIGITS, "--budgets", "w4a4",
                                "--storage", "mysql+nodriver://me:s3cret@127.0.0.1:1/db",
                                "--out", str(tmp_path), "--no-run"))
    assert "s3cret" not in msg


def test_resume_refuses_other_options(capsys, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    (run / "final.json").unlink()
    one_line_error(invoke(capsys, "train", "--resume", str(run), "--lr", "0.1"), "--lr")


def test_a_second_writer_of_a_run_is_refused(tmp_path):
    from coqat.errors import CoqatError
    from coqat.rundir import RunDir

    run = RunDir.create(tmp_path, "r")
    with run.lock():
        other = subprocess_lock(run.path)
        assert other.returncode == 2 and "being written by another" in other.stderr
    assert subprocess_lock(run.path).returncode == 0
    with pytest.raises(CoqatError):
        with run.lock():
            with RunDir(run.path).lock():     # a second lock in the same process is refused too
                pass


def subprocess_lock(path: Path):
    import subprocess

    code = ("import sys\nfrom coqat.rundir import RunDir\nfrom coqat.errors import CoqatError\n"
            f"try:\n    with RunDir({str(path)!r}).lock(): pass\n"
            "except CoqatError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_resume_removes_stale_temp_files_and_does_not_duplicate_metrics(tmp_path):
    """Killed after the final evaluation was logged and the last checkpoint written, before
    final.json: the resumed run evaluates again and logs that evaluation once."""
    from coqat.rundir import RunDir
    from coqat.training import runner

    run, first = train_run(DIGITS, tmp_path, bits="w4a4", steps=6)
    (run.path / "final.json").unlink()
    (run.path / ".config.json.abcd.tmp").write_text("half")
    (run.path / "checkpoints" / ".last.pt.efgh.tmp").write_text("half")
    run2, again = runner.resume(run.path, progress=False)
    assert not list(run.path.glob(".*.tmp")) and not list(run.path.glob("checkpoints/.*.tmp"))
    finals = [r for r in RunDir(run.path).metrics("eval") if r.get("final")]
    assert len(finals) == 1
    assert again.metric == first.metric


def test_a_resumed_search_keeps_its_search_record(tmp_path):
    from coqat.bitsearch import run_search
    from coqat.records import RunRecord
    from coqat.rundir import RunDir
    from coqat.training import runner
    from conftest import run_config

    run, rec = run_search(run_config(LM_MICRO, tmp_path, steps=4), "w4a4", "uniform")
    (run.path / "final.json").unlink()
    runner.resume(run.path, progress=False)
    again = RunRecord.read(RunDir(run.path))
    assert again.search is not None and again.search.method == "uniform"
    assert again.search.budget_bops == rec.search.budget_bops and again.method == "uniform"


# ----- fuzz: generated bad input over the budget, bits, space and bitconfig grammars -----------------
_TOKENS = ["w4a4", "w8a8", "w2a", "a4", "fp32", "0.5", "1e30", "-", "+", "*", "/", "(", ")",
           "G", "k", "[/x]", "[bold]", "\\", "'", '"', "\x00", "é", "1_0", "..", "w16a16",
           "nan", "inf", "**", "%", "{", "}", " ", ",", "0x1f", "1e-400", "__import__"]


def _junk(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_TOKENS) for _ in range(rng.randint(1, n)))


def test_fuzzed_budgets_are_values_or_one_line_errors():
    """Library level, many cases: a budget either parses to a positive int or raises a
    CoqatError whose message is one line and names the budget."""
    from coqat.api import model_and_inputs
    from coqat.cost import CostModel, parse_budget
    from coqat.errors import CoqatError

    model, inputs, space, _ = model_and_inputs(LM_MICRO)
    cost = CostModel.from_model(model, inputs)
    pinned = space.resolve(list(cost.layers), cost.tie_groups).pinned
    rng = random.Random(13)
    for _ in range(400):
        text = _junk(rng, 8)
        try:
            assert parse_budget(text, cost, pinned) > 0
        except CoqatError as e:
            assert "\n" not in str(e) and "budget" in str(e)


_BAD_VALUES = ["-1", "1e999", "nan", "true", "[]", "{}", '"x"', "99999999999999999999"]


def _fuzz_space(rng: random.Random) -> str:
    lines = Path(LM_MICRO).read_text().splitlines()
    i = rng.randrange(len(lines))
    choice = rng.randrange(4)
    if choice == 0:          # drop a line
        del lines[i]
    elif choice == 1:        # replace a value by junk
        if "=" in lines[i]:
            key = lines[i].split("=")[0]
            lines[i] = f"{key}= {rng.choice(_BAD_VALUES)}"
    elif choice == 2:        # a junk line
        lines.insert(i, _junk(rng, 5))
    else:                    # a table where a value should be
        lines.insert(i, f"[{rng.choice(['train', 'search', 'workload', 'search.pinned'])}]")
    return "\n".join(lines) + "\n"


def _fuzz_bitconfig(rng: random.Random, good: dict) -> str:
    doc = json.loads(json.dumps(good))
    layer = rng.choice(list(doc["layers"]))
    choice = rng.randrange(5)
    if choice == 0:
        doc["layers"][layer]["weight"] = {"bits": rng.choice([0, 7, -3, "4", None, 1e9])}
    elif choice == 1:
        doc["schema"] = rng.choice(["coqat.bitconfig/v0", None, 1, "[/x]"])
    elif choice == 2:
        doc["layers"] = rng.choice([[], "x", {"nope": {}}])
    elif choice == 3:
        doc["tie_groups"] = [[layer, "[/missing]"]]
    else:
        return json.dumps(doc)[: rng.randrange(5, 200)]
    return json.dumps(doc)


def test_fuzzed_spaces_bitconfigs_and_budgets_through_the_cli(capsys, tmp_path):
    """CLI level, seeded: every generated bad input exits 2 with one line and no traceback
    (a generated input that happens to be valid must simply succeed)."""
    from conftest import prepare_run

    rng = random.Random(2026)
    prep = prepare_run(LM_MICRO, tmp_path, "w4a4")
    good = tmp_path / "good.json"
    prep.bitconfig.save(good, prep.cost)
    good_doc = json.loads(good.read_text())
    cases = []
    for k in range(12):
        space = tmp_path / f"space{k}.toml"
        space.write_text(_fuzz_space(rng))
        cases.append(["bops", "--space", str(space), "--bits", "w4a4"])
    for k in range(12):
        cfg = tmp_path / f"bits{k}.json"
        cfg.write_text(_fuzz_bitconfig(rng, good_doc))
        cases.append(["bops", "--space", LM_MICRO, "--bits", str(cfg)])
    for k in range(8):
        cases.append(["search", "--space", LM_MICRO, "--budget", _junk(rng, 6), "--method",
                      "uniform", "--baselines", "none", "--no-train", "--out",
                      str(tmp_path / "runs"), "-q"])
    for args in cases:
        code, out, err = invoke(capsys, *args)
        if code == 0:
            continue
        one_line_error((code, out, err))


def test_the_real_command_prints_one_line_for_a_hostile_space(tmp_path):
    space = tmp_path / "space.toml"
    space.write_text(Path(DIGITS).read_text().replace('name = "digits"', 'name = "x.py:Evil"'))
    proc = run_cli("bops", "--space", str(space))
    assert_one_line_error(proc, "names code to import")
