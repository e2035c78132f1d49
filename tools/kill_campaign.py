"""Kill the pipeline at random moments and check, from outside and as a user would, that a killed run never leaves
anything behind and never makes the cache lie.

Usage, from the repository root with the project's Python (each smoke run takes about a minute):

    .venv/bin/python tools/kill_campaign.py --kills 20 --seed 0 --workdir /tmp/campaign [--config configs/smoke.yaml]
        [--stages export,train-head] [--timeout 600] [--keep]

What it does, all of it inside --workdir (created; a folder that is not empty is refused unless an earlier
campaign made it, whose contents are then replaced):

1. Writes a tiny labelled dataset, WORKDIR/dataset/{train,val,test}/<class>/*.jpg: 3 classes of coloured shapes,
   12 train / 4 val / 4 test images each, the same for the same --seed.
2. Runs `python -m pipeline --config CONFIG --data WORKDIR/dataset --artifacts WORKDIR/reference-N/artifacts all`
   twice (N = 1, 2), never killed. Reference 1 gives each stage's duration (its manifest's `duration_s`) and the
   start-up time (from the launch to the first stage's "running" log line). Whatever differs between the two
   (timings, timestamps, ...) is what "varies between runs"; it is listed, and only it is excused in step 3d.
3. For kill k = 1..N: the stage is the k-th of the cycle --stages (all six by default, in pipeline order, so every
   stage gets at least 3 kills when N >= 18). Reference 1's artifacts are copied to WORKDIR/kills/NN-STAGE/artifacts
   (for train-head without the feature store, so that a kill may land while the features are computed), `status`
   must say the copy is fresh, then `python -m pipeline ... --artifacts COPY --force STAGE` is started in its own
   session and only its main process is SIGKILLed (`os.kill(pid, SIGKILL)`, not the group: its children must end by
   themselves) at a moment drawn uniformly from [0.2 s, start-up + the stage's reference duration] (with
   --during stage: from [start-up, start-up + duration], aimed inside the stage). Then:
   a. every process that descended from it (its process tree, polled every 0.1 s until the kill, plus every process
      still in its session) must have ended within 15 s; a zombie counts as ended; one that has not is reported
      and killed;
   b. the same command, run again and not killed, must exit 0. If the stage's new outputs are not byte-identical to
      the old ones, the stages after it are stale afterwards ("inputs changed"); then `all` is run too, as a user
      would, and the table says "fresh after catch-up";
   c. nothing may be left: no temporary folder or file under the artifacts folder (`.tmp/`, `.<stage>.tmp/`, the
      feature store's `.tmp/` and `.*.tmp/`, half-unpacked `sources/*.tmp`, atomic writes' `.NAME.XXXX.tmp.EXT`),
      no `.lock-holder.json` (nor its `.lock-holder.json.PID` draft), nothing new in the runs' system temporary
      folder (see below); and `status` must say every stage is fresh;
   d. the artifacts must equal reference 1's: the same top-level entries, and in each stage's folder and in the
      feature store the same file names and the same bytes, JSON files compared key by key. A difference is excused
      only if the same thing differed between the two reference runs: the same non-JSON file (reason: "differs
      between two never-killed runs"), or for JSON the same field, a field being a file name and a key name (so
      `duration_s` varying in one manifest.json excuses it in every manifest.json, `seconds` in one entry of
      export.json's `formats` list excuses it in all: two runs' timings can be equal by chance, to the hundredth).
4. Prints a table (kill, stage, moment, where the kill landed: start-up, in the stage or after it, the children alive
   at the kill and 15 s later, the rerun, leftovers, status, outputs) and a summary line; writes the same, with
   every detail, to WORKDIR/campaign.json.
   Exit status 1 if any check failed (the reference runs' own checks included), else 0.

The system temporary folder: every pipeline run gets TMPDIR=WORKDIR/tmp, its own system temporary folder (the
pipeline sends its stages' temporary files to `artifacts/.tmp` and restores TMPDIR after each stage), so whatever
appears there came from the campaign's runs, for certain: a kill or a reference run fails on anything new there.
In the shared folder (tempfile.gettempdir(), e.g. /tmp) other programs come and go, so the new `tmp*` entries of
this user there since the campaign began are only listed at the end, as a note for something ignoring TMPDIR.

Logs of every run are kept in the workdir; a kill's artifacts copy is removed when all its checks pass (--keep
keeps it). Every process it starts has a hard timeout (--timeout) and is killed, with everything in its session,
before the script exits, however it exits. Linux only (/proc). --kills 0 runs the two reference runs only (to see
what varies between runs).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "augment", "train-head", "finetune", "evaluate", "export")
AREAS = (*STAGES, "feature-store")  # the folders compared file by file
SETTLE_SECONDS = 15  # how long a killed run's children get to end by themselves
MARKER = ".kill-campaign"  # marks a workdir this script made, which it may empty again
CLASSES = {"circle": (40, 90, 220), "square": (220, 40, 40), "diamond": (240, 200, 30)}
COUNTS = {"train": 12, "val": 4, "test": 4}
HOLDER = ".lock-holder.json"


# -- the dataset -------------------------------------------------------------------------------------------------
def shape_image(rng, colour, shape, size=40):
    """A small RGB image of one coloured shape on a light background, varied by `rng`."""
    background = tuple(int(v) for v in rng.integers(180, 256, 3))
    image = Image.new("RGB", (size + int(rng.integers(0, 8)), size), background)
    x0, y0 = (int(v) for v in rng.integers(2, 8, 2))
    box = (x0, y0, x0 + size // 2 + 8, y0 + size // 2 + 8)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=fill)
    return image


def make_dataset(root, seed):
    """Write the campaign's dataset under `root` (root/<split>/<class>/img_NNN.jpg), the same for the same seed."""
    for s, (split, count) in enumerate(COUNTS.items()):
        for c, (label, colour) in enumerate(CLASSES.items()):
            folder = Path(root) / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, s, c, i])
                shape_image(rng, colour, label).save(folder / f"img_{i:03d}.jpg", quality=90)
    return Path(root)


# -- processes, through /proc --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat this script uses."""

    state: str
    ppid: int
    session: int
    starttime: int  # clock ticks after boot: with the pid, identifies a process even once its pid is reused


def proc_stat(pid):
    """The ProcStat of process `pid`, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return ProcStat(fields[0], int(fields[1]), int(fields[3]), int(fields[19]))


def proc_table():
    """{pid: ProcStat} of every process now."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) is not None:
            table[int(name)] = stat
    return table


def descendants(pid, table):
    """{(pid, starttime)} of every process below `pid` in the process tree `table` (from proc_table)."""
    children = {}
    for child, stat in table.items():
        children.setdefault(stat.ppid, []).append(child)
    found, todo = set(), list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.add((child, table[child].starttime))
        todo.extend(children.get(child, []))
    return found


def session_members(leader, table):
    """{(pid, starttime)} of the processes in the session that process `leader` (a (pid, starttime)) started, but
    the leader itself. Empty if another process now has the leader's pid (its session would be another's);
    processes started before the leader cannot be in it."""
    pid, started = leader
    if pid in table and table[pid].starttime != started:
        return set()
    return {(p, s.starttime) for p, s in table.items() if s.session == pid and p != pid and s.starttime >= started}


def alive(ident):
    """Whether process `ident` ((pid, starttime)) is still running; a zombie has ended."""
    stat = proc_stat(ident[0])
    return stat is not None and stat.starttime == ident[1] and stat.state not in ("Z", "X")


def command_line(pid, limit=160):
    """Process `pid`'s command line, shortened, or '?'."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def kill_process(ident):
    """SIGKILL process `ident` if it is still the same process and alive."""
    if alive(ident):
        with contextlib.suppress(ProcessLookupError):
            os.kill(ident[0], signal.SIGKILL)


def wait_ended(idents, seconds):
    """Wait up to `seconds` for every process of `idents` to end; return those still alive, sorted."""
    deadline = time.monotonic() + seconds
    while (left := [i for i in idents if alive(i)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return sorted(left)


# -- running the pipeline ------------------------------------------------------------------------------------------
class LoggedRun:
    """A command started in a new session, its output (stdout and stderr) logged with each line's arrival time,
    and the processes that descended from it recorded whenever `poll` is called."""

    started = []  # every run this script started, stopped in main's `finally`

    def __init__(self, cmd, log_path, env=None):
        self.cmd, self.log_path = [str(c) for c in cmd], Path(log_path)
        self.lines = []  # (seconds since the start, line)
        self.seen = {}  # (pid, starttime) of each descendant seen -> its command line
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace",
                                     env=env)
        stat = proc_stat(self.proc.pid)
        self.ident = (self.proc.pid, stat.starttime if stat else 0)
        LoggedRun.started.append(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            for line in self.proc.stdout:
                seconds = time.monotonic() - self.t0
                self.lines.append((seconds, line.rstrip("\n")))
                log.write(f"[{seconds:7.2f}] {line}")
                log.flush()

    def elapsed(self):
        """Seconds since the start."""
        return time.monotonic() - self.t0

    def poll(self):
        """Record the processes now below this run's main process; return them ({(pid, starttime)})."""
        now = descendants(self.proc.pid, proc_table())
        for ident in now:
            if ident not in self.seen:
                self.seen[ident] = command_line(ident[0])
        return now

    def wait(self, seconds, every):
        """Wait up to `seconds` for the main process to exit, polling its descendants every `every` seconds;
        return its exit status, or None if it is still running."""
        deadline = self.t0 + seconds
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll()
            time.sleep(min(every, max(deadline - time.monotonic(), 0)))
        return self.proc.poll()

    def kill_main(self):
        """SIGKILL the main process only (not its group) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def family(self):
        """Every process recorded as a descendant, and every process still in this run's session."""
        idents = set(self.seen) | session_members(self.ident, proc_table())
        for ident in idents - set(self.seen):
            self.seen[ident] = command_line(ident[0])
        return idents

    def settle(self, seconds=SETTLE_SECONDS):
        """After the main process has ended: wait up to `seconds` for its descendants to end; kill those that do
        not and return them as ["PID command", ...]."""
        left = wait_ended(self.family(), seconds)
        described = [f"{pid} {self.seen.get((pid, start), '?')}" for pid, start in left]
        for ident in left:
            kill_process(ident)
        wait_ended(left, 5)
        self._reader.join(timeout=2)
        return described

    def stop(self):
        """Kill the main process if it still runs, then everything left of its family."""
        if self.proc.poll() is None:
            self.kill_main()
        for ident in self.family():
            kill_process(ident)
        self._reader.join(timeout=2)

    def first_line(self, pattern):
        """The arrival time of the first output line matching regular expression `pattern`, or None."""
        return next((t for t, line in self.lines if re.search(pattern, line)), None)


@dataclass
class Setup:
    """What every pipeline command of the campaign shares."""

    python: str
    config: Path
    data: Path
    workdir: Path
    timeout: float

    @property
    def temp(self):
        """The runs' own system temporary folder (their TMPDIR)."""
        return self.workdir / "tmp"

    @property
    def env(self):
        """The environment of every pipeline run: this one's, with TMPDIR set to `temp`."""
        return {**os.environ, "TMPDIR": str(self.temp)}

    def command(self, artifacts, *args):
        """`python -m pipeline` with the campaign's config and data, on the artifacts folder `artifacts`."""
        return [self.python, "-m", "pipeline", "--config", self.config, "--data", self.data,
                "--artifacts", artifacts, *args]


@dataclass
class Finished:
    """A run waited for to the end: its exit status ('timeout' if it was killed at the timeout), its children still
    alive SETTLE_SECONDS after it ended (killed then) and the run itself (its output lines)."""

    status: object
    children_left: list
    run: LoggedRun

    @property
    def ok(self):
        """Whether it exited 0 and left no process behind."""
        return self.status == 0 and not self.children_left


def run_to_end(setup, cmd, log_path):
    """Run `cmd` to its end (killed after the setup's timeout), in the setup's environment; return a Finished."""
    run = LoggedRun(cmd, log_path, setup.env)
    try:
        status = run.wait(setup.timeout, every=0.5)
        if status is None:
            run.kill_main()
            status = "timeout"
        return Finished(status, run.settle(), run)
    finally:
        run.stop()


def stage_states(setup, artifacts, log_path):
    """{stage: (state, why)} from `python -m pipeline status` on `artifacts`; ('unknown', ...) for a stage it did not
    list (when it failed)."""
    finished = run_to_end(setup, setup.command(artifacts, "status"), log_path)
    states = parse_status("\n".join(line for _, line in finished.run.lines))
    return {stage: states.get(stage, ("unknown", f"status exited {finished.status}")) for stage in STAGES}


def parse_status(text):
    """{stage: (state, why)} from the text of the status table (other lines ignored)."""
    states = {}
    for line in text.splitlines():
        match = re.match(r"(\S+)\s+(fresh|stale|never run)(?:\s{2,}(.*?))?(?:\s{2,}|$)", line)
        if match and match[1] in STAGES:
            why = "" if match[2] == "fresh" else (match[3] or "")
            states[match[1]] = (match[2], why)
    return states


def not_fresh(states):
    """{stage: 'state (why)'} of the stages that are not fresh."""
    return {s: f"{state} ({why})" if why else state for s, (state, why) in states.items() if state != "fresh"}


# -- what a run must not leave ---------------------------------------------------------------------------------------
def is_leftover(name):
    """Whether a file or folder name is one a finished run must not leave: a temporary folder or file, or the
    lock's holder record (or its draft)."""
    return name == ".tmp" or name.endswith(".tmp") or ".tmp." in name or name.startswith(HOLDER)


def leftovers(artifacts):
    """The relative paths under `artifacts` that a finished run must not leave (not descending into them)."""
    found = []
    for folder, dirs, files in os.walk(artifacts):
        rel = Path(folder).relative_to(artifacts)
        found += [(rel / name).as_posix() for name in files if is_leftover(name)]
        found += [(rel / name).as_posix() + "/" for name in dirs if is_leftover(name)]
        dirs[:] = [name for name in dirs if not is_leftover(name)]
    return sorted(found)


def new_entries(folder, before):
    """The names in `folder` not in `before` (a set of names), sorted, each with '/' if a folder."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir() if p.name not in before)


def temp_listing():
    """{name: (owner uid, ctime)} of the entries of the system temporary folder."""
    listing = {}
    with os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                stat = entry.stat(follow_symlinks=False)
                listing[entry.name] = (stat.st_uid, stat.st_ctime)
    return listing


def new_temp_entries(before, after, since, exclude=()):
    """Names in `after` but not in `before` that start with 'tmp', belong to this user and were made at or after
    `since` (time.time()); `exclude`: names to ignore (the workdir itself)."""
    return sorted(name for name, (uid, ctime) in after.items()
                  if name not in before and name not in exclude and name.startswith("tmp")
                  and uid == os.getuid() and ctime >= since - 1)


# -- comparing artifacts -------------------------------------------------------------------------------------------
@dataclass
class Difference:
    """How one file (or top-level entry) differs: kind 'missing', 'extra', 'bytes' or 'json' (then `fields` holds
    the differing key paths, tuples of keys and list indices)."""

    area: str  # a stage, 'feature-store', or '.' for the artifacts folder's top level
    rel: str
    kind: str
    fields: list = field(default_factory=list)
    detail: str = ""

    @property
    def where(self):
        """The file, relative to the artifacts folder."""
        return self.rel if self.area == "." else f"{self.area}/{self.rel}"

    def describe(self, fields=None):
        """One line: the file and how it differs (only `fields` of a JSON file's fields, if given)."""
        if self.kind == "json":
            shown = sorted({path_text(p, pattern=True) for p in (self.fields if fields is None else fields)})
            return f"{self.where}: {', '.join(shown)}"
        return f"{self.where}: {self.kind}{f' ({self.detail})' if self.detail else ''}"


def path_text(path, pattern=False):
    """A JSON key path as text: summary.formats[3].seconds ([*] for every index if `pattern`)."""
    text = ""
    for part in path:
        text += f"[{'*' if pattern else part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<whole file>"


KEYS = "<keys>"  # the last part of the path of a dict whose set of keys differs


def json_differences(a, b, path=()):
    """The key paths (tuples of keys and list indices) where JSON values `a` and `b` differ: a changed leaf, a dict
    whose set of keys differs (its path and KEYS: keys may be random, like an .mlpackage's item UUIDs), a list of
    another length (its own path)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [] if a.keys() == b.keys() else [(*path, KEYS)]
        for key in sorted(a.keys() & b.keys()):
            found += json_differences(a[key], b[key], (*path, key))
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in json_differences(x, y, (*path, i))]
    return [] if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) else [path]


def compare_file(area, rel, a, b):
    """The Difference between files `a` and `b` (reference, other), or None if their bytes are equal."""
    left, right = Path(a).read_bytes(), Path(b).read_bytes()
    if left == right:
        return None
    if rel.endswith(".json"):
        with contextlib.suppress(ValueError):
            return Difference(area, rel, "json", json_differences(json.loads(left), json.loads(right)))
    return Difference(area, rel, "bytes", detail=text_detail(left, right))


def text_detail(left, right):
    """'lines 3, 9 differ' (or 'line 3 differs') if both are UTF-8 text, else the sizes."""
    try:
        a, b = left.decode().splitlines(), right.decode().splitlines()
    except UnicodeDecodeError:
        return f"{len(left)} vs {len(right)} bytes"
    lines = [str(i + 1) for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i]]
    shown = ", ".join(lines[:8]) + (" ..." if len(lines) > 8 else "")
    return f"lines {shown} differ" if len(lines) > 1 else f"line {shown} differs"


def tree_files(folder):
    """{relative posix path: path} of every file beneath `folder` (empty if it does not exist)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def compare_folders(area, reference, other):
    """The Differences between two folders of the same area: missing and extra files, files that differ."""
    ref, oth = tree_files(reference), tree_files(other)
    diffs = [Difference(area, rel, "missing") for rel in sorted(ref.keys() - oth.keys())]
    diffs += [Difference(area, rel, "extra") for rel in sorted(oth.keys() - ref.keys())]
    for rel in sorted(ref.keys() & oth.keys()):
        if (diff := compare_file(area, rel, ref[rel], oth[rel])) is not None:
            diffs.append(diff)
    return diffs


def compare_artifacts(reference, other):
    """Every Difference of artifacts folder `other` from `reference`: top-level entries, then the files of each
    stage's folder and of the feature store."""
    top = [{p.name for p in Path(folder).iterdir()} for folder in (reference, other)]
    diffs = [Difference(".", name, "missing") for name in sorted(top[0] - top[1])]
    diffs += [Difference(".", name, "extra") for name in sorted(top[1] - top[0])]
    for area in AREAS:
        diffs += compare_folders(area, Path(reference) / area, Path(other) / area)
    return diffs


def field_id(diff, path):
    """What a JSON difference is excused by: the file's name and the last key name on the path (list indices
    skipped), e.g. ('manifest.json', 'duration_s'), or ('Manifest.json', 'itemInfoEntries.<keys>')."""
    keys = [part for part in path if isinstance(part, str)]
    if keys and keys[-1] == KEYS:
        keys = [".".join(keys[-2:])]
    return ("json", Path(diff.rel).name, keys[-1] if keys else "<whole file>")


def varying_ids(diffs):
    """The ids of what differs in `diffs` (between two never-killed runs): JSON fields by field_id, other
    differences by (kind, area, relative path)."""
    ids = set()
    for diff in diffs:
        if diff.kind == "json":
            ids |= {field_id(diff, path) for path in diff.fields}
        else:
            ids.add((diff.kind, diff.area, diff.rel))
    return ids


EXCUSE = "differs between two never-killed runs"


def unexplained(diffs, varying):
    """Split `diffs` by `varying` (from varying_ids of two never-killed runs): (the differences not excused, the
    differences excused and why; both lists of lines of text)."""
    lines, excused = [], []
    for diff in diffs:
        if diff.kind == "json":
            left = [path for path in diff.fields if field_id(diff, path) not in varying]
            if left:
                lines.append(diff.describe(left))
            if len(left) < len(diff.fields):
                excused.append(diff.describe([p for p in diff.fields if p not in left]) + f" ({EXCUSE})")
        elif (diff.kind, diff.area, diff.rel) in varying:
            excused.append(f"{diff.describe()} ({EXCUSE})")
        else:
            lines.append(diff.describe())
    return lines, excused


# -- the reference runs ------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """A never-killed run of every stage: its artifacts, each stage's duration, its start-up time, its problems."""

    artifacts: Path
    durations: dict
    startup: float
    seconds: float
    problems: list


def reference_run(setup, name):
    """Run every stage into WORKDIR/`name`/artifacts, never killed, and check it like a kill's rerun."""
    folder = setup.workdir / name
    artifacts = folder / "artifacts"
    say(f"{name}: running every stage, never killed")
    before = {p.name for p in setup.temp.iterdir()}
    finished = run_to_end(setup, setup.command(artifacts, "all"), folder / "run.log")
    if finished.status != 0:
        raise CampaignError(f"{name} exited {finished.status}; see {folder / 'run.log'}")
    problems = [f"child process alive {SETTLE_SECONDS}s after the end: {c}" for c in finished.children_left]
    problems += [f"left {p}" for p in leftovers(artifacts)]
    problems += [f"left $TMPDIR/{name}" for name in new_entries(setup.temp, before)]
    problems += [f"status: {s} {why}" for s, why in not_fresh(stage_states(setup, artifacts,
                                                                            folder / "status.log")).items()]
    durations = {s: float(json.loads((artifacts / s / "manifest.json").read_text())["duration_s"]) for s in STAGES}
    startup = finished.run.first_line(rf"I {STAGES[0]}\s+running \(")
    if startup is None:  # no "running" line: the log's format changed; the time outside the stages then
        startup = max(finished.run.elapsed() - sum(durations.values()), 0.0)
    say(f"{name}: done in {finished.run.elapsed():.1f}s (start-up {startup:.1f}s; "
        + ", ".join(f"{s} {d:.1f}s" for s, d in durations.items()) + ")"
        + (f"; PROBLEMS: {'; '.join(problems)}" if problems else ""))
    return Reference(artifacts, durations, startup, round(finished.run.elapsed(), 2), problems)


def describe_varying(diffs):
    """The lines that say what differs between the two never-killed runs."""
    return [diff.describe() for diff in diffs] or ["nothing"]


# -- one kill --------------------------------------------------------------------------------------------------------
def copy_reference(reference, target, stage):
    """Copy the reference artifacts to `target`; for train-head without the feature store (so that the forced
    stage computes its features again and a kill may land there)."""
    reference = Path(reference)

    def ignore(folder, names):
        return ["feature-store"] if stage == "train-head" and Path(folder) == reference else []

    shutil.copytree(reference, target, symlinks=True, ignore=ignore)


def kill_phase(run, stage, moment, exit_status):
    """Where the kill landed, from the run's log: 'start-up', 'in STAGE (x s in)', 'after STAGE', or 'not killed'."""
    if exit_status is not None:
        return f"not killed: ended by itself (exit {exit_status})"
    started = run.first_line(rf"I {re.escape(stage)}\s+running \(")
    done = run.first_line(rf"I {re.escape(stage)}\s+done in")
    if done is not None:
        return f"after {stage}"
    if started is None:
        return "start-up"
    return f"in {stage} ({moment - started:.1f}s in)"


def kill_once(setup, cmd, stage, log_path, moment):
    """Start `cmd`, SIGKILL its main process `moment` seconds later (polling its process tree until then) and
    wait for its descendants. Returns (where it landed, the descendants alive at the kill, those alive 15 s
    later: lists of 'PID command line')."""
    run = LoggedRun(cmd, log_path, setup.env)
    try:
        status = run.wait(moment, every=0.1)
        at_kill = set()
        if status is None:
            at_kill = run.poll()
            run.kill_main()
            at_kill |= session_members(run.ident, proc_table())  # any started since the last look
        left = run.settle()
        children = sorted(f"{pid} {run.seen.get((pid, start), '?')}" for pid, start in at_kill)
        return kill_phase(run, stage, moment, status), children, left
    finally:
        run.stop()


def short_name(described):
    """A short name for a 'PID command line' entry: the multiprocessing role, else the program's name."""
    pid, _, line = described.partition(" ")
    for marker, name in (("resource_tracker", "resource tracker"), ("spawn_main", "spawned worker"),
                         ("forkserver", "forkserver")):
        if marker in line:
            return f"{name} {pid}"
    return f"{Path(line.split(' ')[0]).name or '?'} {pid}"


def freshness_after(setup, artifacts, stage, folder):
    """(status text, failures) after the rerun: every stage fresh; if only stages after `stage` are stale, `all` is
    run (a catch-up, as a user would) and then every stage must be fresh."""
    stale = not_fresh(stage_states(setup, artifacts, folder / "status.log"))
    if not stale:
        return "fresh", []
    later = STAGES[STAGES.index(stage) + 1:]
    if not all(s in later and text.startswith("stale") for s, text in stale.items()):
        return "NOT fresh", [f"after the rerun: {s} {text}" for s, text in stale.items()]
    catch_up = run_to_end(setup, setup.command(artifacts, "all"), folder / "catch-up.log")
    failures = [] if catch_up.ok else [f"catch-up `all` exited {catch_up.status}, children left "
                                       f"{catch_up.children_left}"]
    still = not_fresh(stage_states(setup, artifacts, folder / "status-after-catch-up.log"))
    failures += [f"after the catch-up: {s} {text}" for s, text in still.items()]
    text = f"fresh after catch-up ({', '.join(stale)})" if not failures else "NOT fresh after catch-up"
    return text, failures


def one_kill(setup, reference, varying, number, stage, moment, keep):
    """Kill number `number`: kill `stage` at `moment`, rerun, check; return the row of the table (a dict)."""
    folder = setup.workdir / "kills" / f"{number:02d}-{stage}"
    artifacts = folder / "artifacts"
    copy_reference(reference.artifacts, artifacts, stage)
    row = {"kill": number, "stage": stage, "moment_s": round(moment, 2), "failures": []}
    stale = not_fresh(stage_states(setup, artifacts, folder / "status-before.log"))
    row["failures"] += [f"the copy of the reference is not fresh: {s} {t}" for s, t in stale.items()]
    before = {p.name for p in setup.temp.iterdir()}
    cmd = setup.command(artifacts, "--force", stage)
    row["phase"], row["children_at_kill"], row["alive_after_15s"] = kill_once(setup, cmd, stage,
                                                                              folder / "killed.log", moment)
    row["failures"] += [f"alive {SETTLE_SECONDS}s after the kill (killed now): {c}" for c in row["alive_after_15s"]]
    row["left_by_kill"] = leftovers(artifacts)
    check_rerun(setup, cmd, folder, stage, row)
    row["leftovers"] = leftovers(artifacts) + [f"$TMPDIR/{name}" for name in new_entries(setup.temp, before)]
    row["failures"] += [f"left {p}" for p in row["leftovers"]]
    row["differences"], row["excused"] = unexplained(compare_artifacts(reference.artifacts, artifacts), varying)
    row["failures"] += [f"output differs from the reference: {line}" for line in row["differences"]]
    row["passed"] = not row["failures"]
    if row["passed"] and not keep:
        shutil.rmtree(artifacts, ignore_errors=True)
    return row


def check_rerun(setup, cmd, folder, stage, row):
    """Run the killed command `cmd` again to its end, then the status (and catch-up) check; into `row`."""
    rerun = run_to_end(setup, cmd, folder / "rerun.log")
    row["rerun"] = {"exit": rerun.status, "seconds": round(rerun.run.elapsed(), 1),
                    "children_left": rerun.children_left}
    if not rerun.ok:
        row["failures"].append(f"rerun exited {rerun.status}, children left {rerun.children_left}")
    row["status"], failures = freshness_after(setup, folder / "artifacts", stage, folder)
    row["failures"] += failures


def plan(kills, stages, seed, reference, during="run"):
    """[(number, stage, moment)] of the campaign: stages in turn, moments uniform in [0.2 s, start-up + duration]
    (`during` "run"), or in [start-up, start-up + duration] (`during` "stage": aimed inside the stage itself)."""
    rng = random.Random(seed)
    moments = []
    for number in range(1, kills + 1):
        stage = stages[(number - 1) % len(stages)]
        low = reference.startup if during == "stage" else 0.2
        high = max(low + 0.1, reference.startup + reference.durations[stage])
        moments.append((number, stage, rng.uniform(low, high)))
    return moments


# -- the report ------------------------------------------------------------------------------------------------------
def table_cells(row):
    """The table's cells of one kill's row."""
    def listed(items, empty="none"):
        text = "; ".join(items) if items else empty
        return text if len(text) <= 48 else text[:45] + "..."

    rerun = row.get("rerun", {})
    outputs = ("equal" + (f" ({len(row['excused'])} excused)" if row.get("excused") else "")
               if not row.get("differences") else f"DIFFER: {listed(row['differences'])}")
    return [str(row["kill"]), row["stage"], f"{row['moment_s']:.1f}", row.get("phase", "-"),
            listed([short_name(c) for c in row.get("children_at_kill", [])]),
            listed([short_name(c) for c in row.get("alive_after_15s", [])]),
            f"exit {rerun.get('exit', '-')} ({rerun.get('seconds', '-')}s)", listed(row.get("leftovers", [])),
            row.get("status", "-"), outputs, "ok" if row.get("passed") else "FAILED"]


def format_table(rows):
    """The kills as an aligned text table."""
    header = ["#", "stage", "moment s", "landed", "children at kill", "alive after 15s", "rerun", "leftovers", "status",
              "outputs vs reference", "result"]
    cells = [header] + [table_cells(row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def summary_line(rows, references):
    """One line: how many kills, per stage, and how many failed which check."""
    per_stage = {s: sum(r["stage"] == s for r in rows) for s in STAGES if any(r["stage"] == s for r in rows)}
    failed = [r for r in rows if not r["passed"]]
    counts = {
        "children alive after 15s": sum(bool(r.get("alive_after_15s")) for r in rows),
        "leftovers": sum(bool(r.get("leftovers")) for r in rows),
        "not fresh": sum(not str(r.get("status", "")).startswith("fresh") for r in rows),
        "outputs differing": sum(bool(r.get("differences")) for r in rows),
    }
    reference_problems = sum(len(ref.problems) for ref in references)
    if not rows:
        return f"no kills (the reference runs only); reference runs' problems: {reference_problems}"
    return (f"{len(rows)} kills ({', '.join(f'{s} {n}' for s, n in per_stage.items())}): {len(rows) - len(failed)} "
            f"passed, {len(failed)} failed; " + ", ".join(f"{k}: {v}" for k, v in counts.items())
            + f"; reference runs' problems: {reference_problems}")


def say(text):
    """Print a progress line with the time."""
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


# -- the campaign ----------------------------------------------------------------------------------------------------
class CampaignError(Exception):
    """The campaign cannot go on (a reference run failed, a bad workdir)."""


def prepare_workdir(workdir):
    """Create `workdir`, or empty one an earlier campaign made; refuse any other folder that is not empty."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise CampaignError(f"{workdir} is not empty and was not made by this script; give another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by tools/kill_campaign.py; emptied by its next run here\n")
    return workdir


def campaign(args, record):
    """Run the whole campaign, filling `record` (written to campaign.json as it goes); return whether all passed."""
    workdir = prepare_workdir(args.workdir)
    data = make_dataset(workdir / "dataset", args.seed)
    setup = Setup(args.python, Path(args.config).absolute(), data, workdir, args.timeout)
    setup.temp.mkdir()
    campaign_start = time.time()
    temp_at_start = temp_listing()
    references = [reference_run(setup, "reference-1"), reference_run(setup, "reference-2")]
    clean_diffs = compare_artifacts(references[0].artifacts, references[1].artifacts)
    varying = varying_ids(clean_diffs)
    record["reference"] = {"durations_s": references[0].durations, "startup_s": round(references[0].startup, 2),
                           "seconds": [r.seconds for r in references], "problems": [r.problems for r in references]}
    record["varies_between_runs"] = describe_varying(clean_diffs)
    say("varies between two never-killed runs (excused below):\n  " + "\n  ".join(record["varies_between_runs"]))
    rows = record["kills"]
    for number, stage, moment in plan(args.kills, args.stages, args.seed, references[0], args.during):
        say(f"kill {number}/{args.kills}: {stage} at {moment:.1f}s")
        rows.append(one_kill(setup, references[0], varying, number, stage, moment, args.keep))
        say(f"kill {number}: {rows[-1]['phase']}; " + ("ok" if rows[-1]["passed"] else
                                                        "FAILED: " + "; ".join(rows[-1]["failures"])))
        write_record(workdir, record)
    shared = new_temp_entries(temp_at_start, temp_listing(), campaign_start, {workdir.name})
    record["note_shared_temp"] = [f"{tempfile.gettempdir()}/{name}" for name in shared]
    record["summary"] = summary_line(rows, references)
    if rows:
        print(format_table(rows))
    print(record["summary"])
    if shared:
        print(f"note: {len(shared)} new tmp* entries of this user in {tempfile.gettempdir()} since the campaign "
              "began, not counted (the runs had their own TMPDIR; other programs use this folder): "
              + ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else ""))
    return all(r["passed"] for r in rows) and not any(r.problems for r in references)


def write_record(workdir, record):
    """Write the campaign's record to WORKDIR/campaign.json."""
    path = Path(workdir) / "campaign.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args(argv=None):
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20,
                        help="how many runs to kill (default 20; 0: only the two reference runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and the kill moments (default 0)")
    parser.add_argument("--workdir", required=True, help="folder for everything the campaign writes")
    parser.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"), help="pipeline config")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to kill in turn (default: all six, in pipeline order)")
    parser.add_argument("--timeout", type=float, default=600, help="hard timeout of every run, seconds (600)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the pipeline")
    parser.add_argument("--keep", action="store_true", help="keep every kill's artifacts, not only failed ones")
    parser.add_argument("--during", choices=("run", "stage"), default="run",
                        help="draw kill moments over the whole run, start-up included (run), or within the stage's "
                             "reference duration after start-up (stage)")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown or not args.stages or args.kills < 0:
        parser.error(f"--stages must name stages among {', '.join(STAGES)} and --kills be at least 0")
    return args


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through main's `finally`, which stops every process started


def main(argv=None):
    """Run the campaign; exit status 0 if every check passed, 1 if any failed."""
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    record = {"argv": sys.argv, "seed": args.seed, "config": args.config, "stages": args.stages,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kills": []}
    passed = False
    try:
        passed = campaign(args, record)
    except CampaignError as exc:
        record["error"] = str(exc)
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        record["error"] = "interrupted"
        print("interrupted: stopping every process started", file=sys.stderr)
    finally:
        for run in LoggedRun.started:
            run.stop()
        record["finished"], record["passed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z"), passed
        if Path(args.workdir, MARKER).is_file():
            write_record(args.workdir, record)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
