"""Kill a study at random moments (SIGKILL: no handler runs) and check that nothing is lost.

    python bench/chaos.py --kills 50 --seed 0 [--config configs/study.py:smoke] [--out DIR]

Runs the study once undisturbed (the reference), then again in a fresh workdir, killing it at
times drawn by a seeded generator (uniform over `--window` of the reference's duration: a
restarted study resumes, so later kills land further on) and starting it again with the same
command, until it finishes by itself or took `--kills_per_study` kills; repeated over fresh
workdirs until `--kills` kills have landed. Each finished study's results table, report
numbers and recorded streams (record by record) are compared with the reference's, byte for
byte. Prints tables of where each kill landed (the stage that was running, and the write it
interrupted, from the temporary files it left), how many runs finished, and the files that
differ (the goal: none).
"""

from __future__ import annotations

import argparse
import collections
import filecmp
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from array_record.python import array_record_module

from alignment_gap import run_dir, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("results.json", "results.csv", "samples.json")


def _command(config: str, workdir: str) -> list[str]:
    return [sys.executable, "-m", "alignment_gap.main", "--config", config, "--workdir", workdir,
            f"--config.data.dir={os.path.join(workdir, 'data')}"]


def run(config: str, workdir: str, kill_after: float | None) -> tuple[int, str]:
    """(exit status or -9, the stage running when it ended)."""
    proc = subprocess.Popen(_command(config, workdir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = {"stage": "start-up", "tail": collections.deque(maxlen=40)}

    def read():
        for line in proc.stdout:
            seen["tail"].append(line)
            match = re.match(r"== stage (\S+)", line)
            if match:
                seen["stage"] = match.group(1)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join()
        return -9, seen["stage"]
    reader.join()
    if proc.returncode != 0:
        print("".join(seen["tail"]), file=sys.stderr)
    return proc.returncode, seen["stage"]


# What a kill can leave half-written, by the files each write leaves until it completes.
HALF_WRITTEN = {"a checkpoint save": "stages/*/checkpoints/*.orbax-checkpoint-tmp*",
                "a stream chunk": "stages/*/stream/open.array_record.tmp",
                "a dataset build": "data/**/*incomplete*",
                "a JSON record": "**/.*.json.tmp",
                "an evaluation's outcomes": "stages/*/outcomes/.*.npz.tmp"}


def temporary_files(workdir: str) -> dict[str, set]:
    """What -> {(path, modification time)} of the temporary files each kind of write leaves."""
    found = {}
    for what, pattern in HALF_WRITTEN.items():
        paths = glob.glob(os.path.join(workdir, pattern), recursive=True)
        found[what] = {(p, os.stat(p).st_mtime_ns) for p in paths if os.path.exists(p)}
    return found


def half_written(before: dict[str, set], after: dict[str, set]) -> list[str]:
    """The writes a kill interrupted: temporary files that were not there before the run."""
    return [what for what in HALF_WRITTEN if after[what] - before[what]]


def _streams(workdir: str) -> dict[str, str]:
    """Run name -> its recorded stream directory."""
    return {os.path.basename(os.path.dirname(p)).rsplit("-", 1)[0]: p
            for p in glob.glob(os.path.join(workdir, "stages", "*", run_dir.STREAM))}


def stream_records(directory: str) -> list[bytes]:
    """Every example a run recorded, in step order. Compared record by record, not file by
    file: a preempted run seals its open chunk at the step it stopped, so its files split
    the same records differently."""
    out = []
    for path in sources.stream_chunks(directory):
        reader = array_record_module.ArrayRecordReader(path)
        out += reader.read_all()
        reader.close()
    return out


def differences(reference: str, workdir: str) -> list[str]:
    out = [name for name in COMPARED
           if not filecmp.cmp(os.path.join(reference, name), os.path.join(workdir, name),
                              shallow=False)]
    ref_streams, streams = _streams(reference), _streams(workdir)
    out += [f"stream {k}" for k in sorted(set(ref_streams) | set(streams))
            if k not in ref_streams or k not in streams
            or stream_records(ref_streams[k]) != stream_records(streams[k])]
    numbers = lambda path: re.findall(r"\d+\.\d+", open(path).read().split("## Setting")[0])
    if numbers(os.path.join(reference, "report.md")) != numbers(os.path.join(workdir,
                                                                            "report.md")):
        out.append("report.md numbers")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "study.py:smoke"))
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--kills_per_study", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--out", default="/tmp/alignment_gap_chaos")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    reference = os.path.join(args.out, "reference")
    start = time.monotonic()
    status, _ = run(args.config, reference, None)
    assert status == 0, "the undisturbed study failed"
    duration = time.monotonic() - start
    print(f"reference study: {duration:.0f} s", flush=True)

    landed, inside, studies, lost, failures = (collections.Counter(), collections.Counter(), 0,
                                                [], 0)
    while sum(landed.values()) < args.kills:
        workdir = os.path.join(args.out, f"study{studies}")
        for _ in range(args.kills_per_study):
            if sum(landed.values()) >= args.kills:
                break
            after = rng.uniform(0.0, args.window * duration)
            before = temporary_files(workdir)
            status, stage = run(args.config, workdir, after)
            if status != -9:
                break  # finished (or failed) before the kill
            landed[stage.rsplit("-", 1)[0]] += 1
            writes = half_written(before, temporary_files(workdir))
            inside.update(writes)
            print(f"  killed after {after:.1f} s in stage {stage}"
                  f"{' inside ' + ', '.join(writes) if writes else ''}", flush=True)
        else:
            status = None
        if status != 0:
            status, _ = run(args.config, workdir, None)
        if status != 0:
            failures += 1
            lost.append(f"study{studies}: exit {status}")
        else:
            lost += [f"study{studies}: {d}" for d in differences(reference, workdir)]
        studies += 1
        print(f"study {studies}: {sum(landed.values())} kills so far", flush=True)

    print("\n| stage running when killed | kills |\n| --- | --- |")
    for stage, count in landed.most_common():
        print(f"| {stage} | {count} |")
    print("\n| write in progress when killed (its temporary files left) | kills |\n| --- | --- |")
    for what in HALF_WRITTEN:
        print(f"| {what} | {inside[what]} |")
    print(f"\n{sum(landed.values())} kills (SIGKILL) over {studies} studies; {failures} reruns "
          f"failed; files that differ from the undisturbed study: {len(lost)}")
    for line in lost:
        print(f"  {line}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
