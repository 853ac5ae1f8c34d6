"""Reference runs with CP2K: build a water box, equilibrate it in FIST, produce, ingest.

A reference config (TOML, see ``configs/reference/``) names the system (number of
molecules, box, seed), an equilibration stage (a CP2K input run as NVT with a
CSVR thermostat) and a production stage (a CP2K input run as written, NVE). The
runner works in a directory of its own:

``work/water.xyz``
    the starting box, built by :func:`ensemble.waterbox.build_water_box`.
``work/equilibration/``, ``work/production/``
    one CP2K run each, started with ``mpirun -np N cp2k.popt`` (or ``cp2k.psmp``
    when N is 1). Production starts from the equilibration's restart file
    (positions and velocities).

Progress (steps done, s/step, ETA) is read from the growing ``.ener`` file. A run
that is stopped (Ctrl-C, killed machine) is resumed by running the same command:
output written after CP2K's last restart file is cut off and CP2K continues from
that restart, so the trajectory has every step exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .configfile import read_toml
from .io.cp2k import ingest_cp2k
from .io.cp2k_input import Section, read_input, render_input
from .waterbox import build_water_box
from .errors import UserError

__all__ = ["ReferenceConfig", "Cp2kNotFound", "Cp2kFailed", "load_reference_config", "find_cp2k",
           "run_reference", "truncate_outputs"]


class Cp2kNotFound(UserError, RuntimeError):
    """No CP2K executable on this machine."""


class Cp2kFailed(UserError, RuntimeError):
    """CP2K exited with an error."""


class ConfigError(UserError, ValueError):
    """A reference config is malformed."""


@dataclass(frozen=True)
class Stage:
    input: Path
    steps: int
    temperature_K: float
    thermostat: str | None = None  # "CSVR" for equilibration, None: run the input's ensemble
    timecon_fs: float = 50.0
    #: CP2K thermostat REGION: MASSIVE (one thermostat per atom) equilibrates every degree of
    #: freedom directly; a GLOBAL one cannot move energy between fast intramolecular modes and
    #: the rest, and a freshly built box then keeps H and O at different temperatures for >10 ps
    thermostat_region: str = "MASSIVE"


@dataclass(frozen=True)
class ReferenceConfig:
    """A reference run: system, equilibration, production (see ``configs/reference/``)."""

    path: Path
    name: str
    n_molecules: int
    box_angstrom: float
    seed: int
    equilibration: Stage
    production: Stage
    mpi_ranks: int = 1


def load_reference_config(path: str | Path) -> ReferenceConfig:
    """Read a reference TOML config; input paths are relative to the config's directory."""
    path = Path(path)
    raw = read_toml(path, "config", ConfigError)

    def need(table: dict, key: str, where: str, kind=None):
        if key not in table:
            raise ConfigError(f"{path}: [{where}] needs '{key}'")
        value = table[key]
        if kind is not None and not isinstance(value, kind):
            raise ConfigError(f"{path}: [{where}] {key} = {value!r} should be {kind.__name__}")
        return value

    for section in ("system", "equilibration", "production"):
        if section not in raw:
            raise ConfigError(f"{path}: missing section [{section}]")
    sysc = raw["system"]

    def stage(name: str, thermostat_default):
        t = raw[name]
        inp = (path.parent / need(t, "input", name, str)).resolve()
        if not inp.is_file():
            raise ConfigError(f"{path}: [{name}] input {inp} does not exist")
        return Stage(input=inp, steps=int(need(t, "steps", name, int)),
                     temperature_K=float(t.get("temperature_K", 300.0)),
                     thermostat=t.get("thermostat", thermostat_default),
                     timecon_fs=float(t.get("timecon_fs", 50.0)),
                     thermostat_region=str(t.get("thermostat_region", "MASSIVE")).upper())

    n = int(need(sysc, "n_molecules", "system", int))
    if n < 1:
        raise ConfigError(f"{path}: [system] n_molecules must be >= 1")
    box = sysc.get("box_angstrom")
    if box is None:
        from .waterbox import box_edge_for_density

        box = box_edge_for_density(n, float(sysc.get("density_g_cm3", 0.997)))
    return ReferenceConfig(path=path.resolve(), name=str(raw.get("name", path.stem)), n_molecules=n,
                           box_angstrom=float(box), seed=int(need(sysc, "seed", "system", int)),
                           equilibration=stage("equilibration", "CSVR"),
                           production=stage("production", None),
                           mpi_ranks=int(raw["production"].get("mpi_ranks", 1)))


def find_cp2k(explicit: str | None = None) -> list[str]:
    """Command prefix that runs CP2K (without ``-i``)."""
    if explicit:
        exe = shutil.which(explicit)
        if exe is None:
            raise Cp2kNotFound(f"CP2K executable {explicit!r} not found")
        return [exe]
    for name in ("cp2k.psmp", "cp2k.ssmp", "cp2k.popt", "cp2k.sopt", "cp2k"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise Cp2kNotFound(
        "CP2K is not installed (no cp2k.psmp / cp2k.popt / cp2k on PATH). On Debian or Ubuntu: "
        "`sudo apt-get install -y cp2k` (provides cp2k.psmp and cp2k.popt with MPI); elsewhere see "
        "https://www.cp2k.org/download, or pass --cp2k /path/to/cp2k.psmp")


def _cp2k_command(mpi_ranks: int, explicit: str | None) -> list[str]:
    base = find_cp2k(explicit)
    if mpi_ranks <= 1:
        return base
    popt = shutil.which("cp2k.popt") if explicit is None else base[0]
    mpirun = shutil.which("mpirun")
    if mpirun is None or popt is None:
        raise Cp2kNotFound("running CP2K on several MPI ranks needs mpirun and cp2k.popt "
                           "(`apt-get install -y cp2k openmpi-bin`)")
    return [mpirun, "-np", str(mpi_ranks), popt]


# --------------------------------------------------------------------------- inputs
def _set_common(root: Section, project: str, steps: int, box: float, coord_file: str, seed: int) -> None:
    glob = root.ensure("GLOBAL")
    glob.set("PROJECT", project)
    glob.set("SEED", str(seed))
    root.ensure("MOTION/MD").set("STEPS", str(steps))
    cell = root.ensure("FORCE_EVAL/SUBSYS/CELL")
    cell.keywords = [(k, v) for k, v in cell.keywords if k.upper() not in ("A", "B", "C", "ABC")]
    cell.set("ABC", f"[angstrom] {box:.10f} {box:.10f} {box:.10f}")
    topo = root.ensure("FORCE_EVAL/SUBSYS/TOPOLOGY")
    topo.set("COORD_FILE_NAME", coord_file)
    topo.set("COORD_FILE_FORMAT", "XYZ")


def equilibration_input(cfg: ReferenceConfig, coord_file: str) -> str:
    """The equilibration input: the stage's input, run NVT with a CSVR thermostat, sparse output."""
    st = cfg.equilibration
    root = read_input(st.input)
    _set_common(root, "equilibration", st.steps, cfg.box_angstrom, coord_file, cfg.seed)
    md = root.ensure("MOTION/MD")
    md.set("TEMPERATURE", f"{st.temperature_K}")
    if st.thermostat:
        md.set("ENSEMBLE", "NVT")
        md.remove_section("THERMOSTAT")
        th = md.ensure("THERMOSTAT")
        th.set("TYPE", st.thermostat.upper())
        th.set("REGION", st.thermostat_region)
        th.ensure(st.thermostat.upper()).set("TIMECON", f"[fs] {st.timecon_fs}")
    pr = root.ensure("MOTION/PRINT")
    for name in ("TRAJECTORY", "VELOCITIES", "FORCES", "CELL"):
        pr.ensure(name).ensure("EACH").set("MD", "100")
    pr.ensure("RESTART").ensure("EACH").set("MD", "100")
    return render_input(root)


def production_input(cfg: ReferenceConfig, coord_file: str, steps: int, start_restart: str) -> str:
    """The production input, started from the equilibrated positions and velocities."""
    st = cfg.production
    root = read_input(st.input)
    _set_common(root, "production", steps, cfg.box_angstrom, coord_file, cfg.seed + 1)
    root.ensure("MOTION/MD").set("TEMPERATURE", f"{st.temperature_K}")
    root.remove_section("EXT_RESTART")
    ext = root.ensure("EXT_RESTART")
    ext.set("RESTART_FILE_NAME", start_restart)
    ext.set("RESTART_DEFAULT", "F")
    ext.set("RESTART_POS", "T")
    ext.set("RESTART_VEL", "T")
    ext.set("RESTART_COUNTERS", "F")
    return render_input(root)


# --------------------------------------------------------------------------- running
def _restart_step(restart: Path) -> int:
    md = read_input(restart).section("MOTION/MD")
    v = md.keyword("STEP_START_VAL") if md is not None else None
    return int(v) if v is not None else 0


def truncate_outputs(workdir: Path, project: str, last_step: int) -> None:
    """Cut every trajectory / energy / cell file of ``project`` after step ``last_step``.

    Used before resuming from a restart written at ``last_step``: CP2K appends, so
    frames written after that restart would otherwise appear twice.
    """
    for path in sorted(workdir.glob(f"{project}-*-1.xyz")):
        keep = 0
        with open(path, "rb") as fh:
            while True:
                head = fh.readline()
                if not head.strip():
                    break
                natoms = int(head)
                header = fh.readline()
                try:
                    step = int(header.split(b"=")[1].split(b",")[0])
                except (IndexError, ValueError):
                    break
                lines = [fh.readline() for _ in range(natoms)]
                if step > last_step or len(lines) < natoms or not lines[-1].endswith(b"\n"):
                    break
                keep = fh.tell()
        with open(path, "r+b") as fh:
            fh.truncate(keep)
    for path in [workdir / f"{project}-1.ener", workdir / f"{project}-1.cell"]:
        if not path.exists():
            continue
        out = []
        for line in path.read_text().splitlines(keepends=True):
            s = line.split()
            if line.startswith("#") or not s:
                out.append(line)
                continue
            try:
                if int(s[0]) <= last_step and line.endswith("\n"):
                    out.append(line)
            except ValueError:
                break
        path.write_text("".join(out))


def _last_ener_step(ener: Path) -> int | None:
    if not ener.exists():
        return None
    try:
        with open(ener, "rb") as fh:
            fh.seek(max(ener.stat().st_size - 400, 0))
            lines = [ln for ln in fh.read().splitlines() if ln.strip() and not ln.startswith(b"#")]
        return int(lines[-2 if len(lines) > 1 else -1].split()[0]) if lines else None
    except (ValueError, IndexError, OSError):
        return None


def _run_stage(label: str, workdir: Path, project: str, total_steps: int, make_input: Callable[[int], str],
               command: list[str], report: Callable[[str], None]) -> None:
    """Run (or resume, or skip when complete) one CP2K stage in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    restart = workdir / f"{project}-1.restart"
    done_marker = workdir / "COMPLETE"
    if done_marker.exists():
        report(f"[{label}] complete ({total_steps} steps), skipping")
        return
    if restart.exists():
        start = _restart_step(restart)
        if start >= total_steps:
            done_marker.write_text(f"{total_steps}\n")
            return
        truncate_outputs(workdir, project, start)
        root = read_input(restart)
        root.remove_section("EXT_RESTART")
        root.ensure("MOTION/MD").set("STEPS", str(total_steps - start))
        text = render_input(root)
        report(f"[{label}] resuming from step {start} ({restart.name})")
    else:
        start = 0
        for p in workdir.glob(f"{project}-*"):
            p.unlink()
        text = make_input(total_steps)
    inp = workdir / f"{project}.inp"
    inp.write_text(text)
    log = workdir / f"{project}.out"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with open(log, "ab") as logfh:
        proc = subprocess.Popen(command + ["-i", inp.name], cwd=workdir, stdout=logfh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0, s0 = time.monotonic(), start
    ener = workdir / f"{project}-1.ener"
    tty = sys.stderr.isatty()
    every, last = (0.5 if tty else 30.0), time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if time.monotonic() - last < every:
                continue
            last = time.monotonic()
            step = _last_ener_step(ener)
            if step is not None and step > s0:
                rate = (time.monotonic() - t0) / (step - s0)
                eta = rate * (total_steps - step)
                msg = f"[{label}] step {step}/{total_steps}  {rate:.4f} s/step  ETA {eta:,.0f} s"
                report(f"\r{msg}   " if tty else msg)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        last = _restart_step(restart) if restart.exists() else 0
        raise KeyboardInterrupt(f"[{label}] stopped; rerun the same command to resume from step {last}") from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise Cp2kFailed(f"[{label}] CP2K exited with code {proc.returncode}; last lines of {log}:\n"
                         + "\n".join(tail))
    done = f"[{label}] done: {total_steps - start} steps in {time.monotonic() - t0:.1f} s"
    report(f"\r{done}{' ' * 20}\n" if tty else done)
    done_marker.write_text(f"{total_steps}\n")


def cp2k_version(command: list[str]) -> str:
    try:
        out = subprocess.run(command[-1:] + ["--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    line = next((ln for ln in out.splitlines() if "CP2K version" in ln), "unknown")
    return line.strip()


def run_reference(config: str | Path | ReferenceConfig, out: str | Path, *, steps: int | None = None,
                  workdir: str | Path | None = None, cp2k: str | None = None, mpi_ranks: int | None = None,
                  overwrite: bool = False, report: Callable[[str], None] | None = None):
    """Build, equilibrate, produce and ingest a CP2K reference trajectory.

    Parameters
    ----------
    config : path or ReferenceConfig
    out : path
        Trajectory store to write.
    steps : int, optional
        Production steps (default: the config's).
    workdir : path, optional
        Where CP2K runs (default ``OUT.cp2k`` beside the store). Rerunning with the
        same workdir resumes or skips finished stages.

    Returns
    -------
    ensemble.io.IngestReport
    """
    cfg = config if isinstance(config, ReferenceConfig) else load_reference_config(config)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    report = report or (lambda msg: (sys.stderr.write(msg if msg.startswith("\r") else msg + "\n"),
                                     sys.stderr.flush()))
    nsteps = int(steps if steps is not None else cfg.production.steps)
    if nsteps < 1:
        raise ValueError(f"--steps must be >= 1, got {nsteps}")
    ranks = int(mpi_ranks or cfg.mpi_ranks)
    command = _cp2k_command(ranks, cp2k)
    work = Path(workdir) if workdir else out.with_name(out.name + ".cp2k")
    work.mkdir(parents=True, exist_ok=True)
    xyz = work / "water.xyz"
    if not xyz.exists():
        box = build_water_box(cfg.n_molecules, seed=cfg.seed, box_angstrom=cfg.box_angstrom)
        box.write_xyz(xyz)
        report(f"built {cfg.n_molecules} H2O in a {cfg.box_angstrom:.4f} Å box (seed {cfg.seed}) -> {xyz}")
    eq_dir, prod_dir = work / "equilibration", work / "production"
    _run_stage("equilibration", eq_dir, "equilibration", cfg.equilibration.steps,
               lambda n: equilibration_input(cfg, "../water.xyz"), command, report)
    prod_marker = prod_dir / "COMPLETE"
    if prod_marker.exists() and int(prod_marker.read_text()) != nsteps:
        raise ValueError(f"{prod_dir} holds a finished production of {prod_marker.read_text().strip()} steps, "
                         f"not {nsteps}; use another --workdir")
    _run_stage("production", prod_dir, "production", nsteps,
               lambda n: production_input(cfg, "../water.xyz", n, "../equilibration/equilibration-1.restart"),
               command, report)
    provenance = {
        "reference_run": {
            "config": str(cfg.path), "config_text": cfg.path.read_text(),
            "n_molecules": cfg.n_molecules, "box_angstrom": cfg.box_angstrom, "seed": cfg.seed,
            "equilibration_steps": cfg.equilibration.steps,
            "equilibration": f"NVT {cfg.equilibration.thermostat} ({cfg.equilibration.thermostat_region}) "
                             f"{cfg.equilibration.temperature_K} K, timecon {cfg.equilibration.timecon_fs} fs",
            "production_steps": nsteps, "cp2k": cp2k_version(command),
            "command": " ".join(command + ["-i", "production.inp"]),
        }
    }
    report(f"ingesting {prod_dir} -> {out}")
    return ingest_cp2k(prod_dir / "production", out, input_file=prod_dir / "production.inp",
                       overwrite=overwrite, extra_attrs=provenance)


def equilibrated_temperature(workdir: Path) -> float:
    """Mean temperature (K) over the last half of an equilibration's .ener file."""
    t = np.loadtxt(workdir / "equilibration" / "equilibration-1.ener")
    return float(t[len(t) // 2:, 3].mean())
