#!/usr/bin/env python3
"""Mutation testing of the C++/CUDA sources with the hand-written mutants of cpp_mutants.py.

For each mutant: copy the repository (its tracked and untracked-but-not-ignored files, plus the built
fod_kernels/*.so) to a temporary folder, apply the mutant there, rebuild the CPU extension if the mutant needs
it, and run the relevant test groups. The working tree is never touched. A mutant is *killed* when a test
group fails (or the run times out). The test groups of this issue's new tests (NEW_GROUPS) run after the
others, so one run gives the kill rate without them ("before") and with them ("after").

    python3 tools/mutants/run_cpp_mutants.py                 # all mutants (1-3 hours on 2 shared cores)
    python3 tools/mutants/run_cpp_mutants.py --only drop-eps,cuda-alpha
    python3 tools/mutants/run_cpp_mutants.py --check         # only check that every mutant still applies
    python3 tools/mutants/run_cpp_mutants.py --baseline      # first run the groups on the unmutated copy
    python3 tools/mutants/run_cpp_mutants.py --set recipe    # the FOD recipe's Python constants (no build)

Results: a table on stdout; a JSON file (--out, default results.json) and one log per mutant in the temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import cpp_mutants  # noqa: E402
import recipe_mutants  # noqa: E402

SETS = {"cpp": cpp_mutants.MUTANTS, "recipe": recipe_mutants.MUTANTS}

GROUPS = {  # name -> pytest arguments (paths relative to the repository root)
    "cpu": ["tests/kernels/test_cpu.py"],
    "api": ["tests/kernels/test_api.py", "tests/fod/test_fod_model.py"],
    "sim": ["tests/kernels/test_cuda_sim.py"],
    "fod": ["tests/fod", "--ignore=tests/fod/test_fod_pins.py"],
    "ulp": ["tests/kernels/test_math_ulp.py"],
    "pins": ["tests/fod/test_fod_pins.py"],
    "edges": ["tests/kernels/test_kernel_edges.py"],
}
NEW_GROUPS = {"ulp", "pins", "edges"}  # added by issue 16: counted for "after" only
USES_BUILT_EXTENSION = {"cpu", "api", "fod", "edges"}  # the others compile what they test themselves, or need no C++


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "fod_kernels").glob("_C*.so")]
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def apply(work: Path, m) -> None:
    path = work / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise LookupError(f"mutant {m.id}: {n} occurrences of its text in {m.file} (expected 1): update cpp_mutants.py")
    path.write_text(text.replace(m.old, m.new))


def env_for(work: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(work), TORCH_EXTENSIONS_DIR=str(work / ".torch_extensions"),
               HYPOTHESIS_PROFILE="ci", FOD_BUILD_CUDA="0", MAX_JOBS=env.get("MAX_JOBS", "2"),
               CFLAGS=env.get("CFLAGS", "-g0"))
    env.pop("FOD_KERNELS_JIT", None)
    return env


def run_logged(cmd, work: Path, log: Path, timeout: float):
    """Exit code of cmd, or None when it ran past `timeout` (then its whole process group is killed: compilers and
    test processes do not outlive it)."""
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        p = subprocess.Popen(cmd, cwd=work, env=env_for(work), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None


def build_cpu(work: Path, log: Path, timeout: float) -> str:
    """'ok', 'error' or 'timeout'."""
    for so in (work / "fod_kernels").glob("_C.*.so"):
        so.unlink()
    rc = run_logged([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], work, log, timeout)
    return "timeout" if rc is None else "ok" if rc == 0 else "error"


def run_group(work: Path, group: str, log: Path, timeout: float) -> str:
    """'pass', 'fail' or 'timeout'."""
    rc = run_logged([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *GROUPS[group]], work, log,
                    timeout)
    return "timeout" if rc is None else "pass" if rc == 0 else "fail"


def run_mutant(m, base: Path, tmp: Path, timeout: float, skip_old: bool = False) -> dict:
    work = tmp / f"m-{m.id}"
    shutil.copytree(base, work, symlinks=True)
    log = tmp / f"{m.id}.log"
    res = {"id": m.id, "file": m.file, "what": m.what, "harmless": m.harmless, "killed_by": None,
           "before": "survived", "after": "survived", "log": str(log)}
    t0 = time.time()
    try:
        apply(work, m)
        old = [g for g in m.groups if g not in NEW_GROUPS]
        new = [g for g in m.groups if g in NEW_GROUPS]
        if skip_old:  # only the new tests: "before" unknown
            res["before"], old = "not run", []
        if m.build == "cpu" and USES_BUILT_EXTENSION & set(old + new):
            st = build_cpu(work, log, timeout)
            if st != "ok":  # not a verdict: a hand-written mutant must compile (and a build must finish)
                res.update(before=f"build {st}", after=f"build {st}")
                return res
        for phase, groups in (("before", old), ("after", new)):
            for g in groups:
                st = run_group(work, g, log, timeout)
                if st != "pass":
                    res["killed_by"] = f"{g} ({st})"
                    if phase == "before":
                        res["before"] = "killed"
                    res["after"] = "killed"
                    return res
    finally:
        res["seconds"] = round(time.time() - t0, 1)
        shutil.rmtree(work, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="cpp", choices=sorted(SETS),
                    help="cpp: C++/CUDA mutants (cpp_mutants.py); recipe: the FOD recipe's Python constants "
                         "(recipe_mutants.py)")
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies exactly once")
    ap.add_argument("--baseline", action="store_true", help="run all groups unmutated first (must pass)")
    ap.add_argument("--skip-old", action="store_true",
                    help="run only the new test groups (quick check that they kill; no 'before' verdict)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per build or test group (default 3600)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)

    mutants = SETS[args.set]
    chosen = [m for m in mutants if not args.only or m.id in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.id for m in mutants}
    if unknown:
        ap.error(f"unknown mutant ids: {sorted(unknown)}")
    for m in chosen:
        text = (ROOT / m.file).read_text()
        if text.count(m.old) != 1:
            print(f"STALE {m.id}: {text.count(m.old)} occurrences in {m.file}", file=sys.stderr)
            return 2
        bad = [g for g in m.groups if g not in GROUPS]
        if bad or m.build not in ("cpu", "none"):
            print(f"BAD {m.id}: groups {bad}, build {m.build!r}", file=sys.stderr)
            return 2
    if args.check:
        print(f"{len(chosen)} mutants apply")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="fod-cpp-mutants-"))
    base = tmp / "base"
    copy_repo(base)
    print(f"copy of {ROOT} in {base}; logs in {tmp}", flush=True)
    if args.baseline:
        log = tmp / "baseline.log"
        for g in dict.fromkeys(g for m in chosen for g in m.groups if not (args.skip_old and g not in NEW_GROUPS)):
            st = run_group(base, g, log, args.timeout)
            print(f"baseline {g}: {st}", flush=True)
            if st != "pass":
                print(f"the unmutated tests fail ({g}); see {log}", file=sys.stderr)
                return 1
    results = []
    for m in chosen:
        r = run_mutant(m, base, tmp, args.timeout, args.skip_old)
        results.append(r)
        print(f"{r['id']:20s} before {r['before']:9s} after {r['after']:9s} {r['killed_by'] or '':14s} "
              f"{r['seconds']:7.1f}s  {r['what']}", flush=True)

    def rate(phase):
        k = sum(r[phase] == "killed" for r in results)
        return f"{k}/{len(results)} killed ({100 * k / max(1, len(results)):.0f}%)"

    print(f"\nbefore (without {sorted(NEW_GROUPS)}): {rate('before')}")
    print(f"after: {rate('after')}")
    for r in results:
        if r["after"] != "killed":
            print(f"SURVIVOR {r['id']}: {r['what']}; " + (f"harmless: {r['harmless']}" if r["harmless"]
                                                          else "NOT ARGUED HARMLESS: kill it with a test"))
    out = Path(args.out) if args.out else tmp / "results.json"
    out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(base, ignore_errors=True)
    print(f"results: {out} (logs beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
