"""Water structure and stability per frame from nearest-O topology (a stand-alone check for issue 11).

    python benchmarks/water_topology.py STORE [STORE ...] [--frames START:STOP[:STRIDE]] [--json]

For every frame each H is assigned to its nearest O (minimum image). Reported per store:
H-O-H angle (mean, std) over O with exactly two H; intramolecular H-H distance (mean) and the
first peak of g_HH (all H pairs, 0.02 Å bins, the maximum below 2.2 Å); O-H bond length mean;
H3O+ and OH- per frame (O with 3 and 1 H); failures after the stability criteria of the issue
"Analysis that is right for real ab-initio water": an H farther than 1.5 Å from every O, an O
with >= 4 H, an O-O pair closer than 2.0 Å. Configuration sets and trajectories alike (positions
and cell only). Kept outside the package: ``ensemble.analysis`` is the package's analysis.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ensemble.io import open_trajectory
from ensemble.invariants import orthorhombic_box


def frame_topology(pos: np.ndarray, box: np.ndarray, is_o: np.ndarray) -> dict:
    o = np.flatnonzero(is_o)
    h = np.flatnonzero(~is_o)
    d = pos[h][:, None, :] - pos[o][None, :, :]
    d -= box * np.rint(d / box)
    r = np.linalg.norm(d, axis=-1)                      # (H, O)
    near = np.argmin(r, axis=1)
    r_near = r[np.arange(h.size), near]
    count = np.bincount(near, minlength=o.size)
    angles, hh, oh = [], [], []
    for j in np.flatnonzero(count == 2):
        a, b = np.flatnonzero(near == j)
        va, vb = -d[a, j], -d[b, j]                     # O -> H
        cos = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
        angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
        hh.append(np.linalg.norm(va - vb))
        oh += [np.linalg.norm(va), np.linalg.norm(vb)]
    doo = pos[o][:, None, :] - pos[o][None, :, :]
    doo -= box * np.rint(doo / box)
    roo = np.linalg.norm(doo, axis=-1) + 1e9 * np.eye(o.size)
    dhh = pos[h][:, None, :] - pos[h][None, :, :]
    dhh -= box * np.rint(dhh / box)
    rhh = np.linalg.norm(dhh, axis=-1)[np.triu_indices(h.size, 1)]
    return {"angles": angles, "hh_intra": hh, "oh": oh, "h3o": int(np.sum(count == 3)), "oh_minus": int(np.sum(count == 1)),
            "o_4h": int(np.sum(count >= 4)), "h_far": int(np.sum(r_near > 1.5)), "oo_min": float(roo.min()),
            "hh_all": rhh}


def store_summary(path: str, frames: slice = slice(None)) -> dict:
    ds = open_trajectory(path).isel(frame=frames)
    is_o = np.array([str(s) == "O" for s in ds["species"].values])
    boxes = orthorhombic_box(ds["cell"].values)
    n = ds.sizes["frame"]
    boxes = np.broadcast_to(boxes, (n, 3)) if boxes.ndim == 1 else boxes
    pos = ds["positions"].values
    ang, hh, oh, ions, fails, oo_min = [], [], [], [], [], np.inf
    edges = np.arange(0.0, 4.0001, 0.02)
    hist = np.zeros(edges.size - 1)
    for t in range(n):
        top = frame_topology(pos[t], boxes[t], is_o)
        ang += top["angles"]
        hh += top["hh_intra"]
        oh += top["oh"]
        ions.append((top["h3o"], top["oh_minus"]))
        hist += np.histogram(top["hh_all"], edges)[0]
        bad = top["h_far"] > 0 or top["o_4h"] > 0 or top["oo_min"] < 2.0
        fails.append(bad)
        oo_min = min(oo_min, top["oo_min"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    shell = 4 * np.pi * centres ** 2 * np.diff(edges)
    g = hist / shell                                    # unnormalised g_HH: the peak position is what counts
    below = centres < 2.2
    ions = np.array(ions)
    first_fail = int(np.argmax(fails)) if any(fails) else None
    return {"store": str(path), "frames": n, "hoh_angle_mean_deg": float(np.mean(ang)), "hoh_angle_std_deg": float(np.std(ang)),
            "hh_intra_mean_angstrom": float(np.mean(hh)), "g_hh_first_peak_angstrom": float(centres[below][np.argmax(g[below])]),
            "oh_bond_mean_angstrom": float(np.mean(oh)), "h3o_per_frame": float(ions[:, 0].mean()),
            "oh_minus_per_frame": float(ions[:, 1].mean()), "frames_failing": int(np.sum(fails)),
            "first_failing_frame": first_fail, "oo_min_angstrom": float(oo_min)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", nargs="+")
    p.add_argument("--frames", help="START:STOP[:STRIDE]")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    sl = slice(*[int(x) if x else None for x in a.frames.split(":")]) if a.frames else slice(None)
    rows = [store_summary(s, sl) for s in a.stores]
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"{r['store']}: {r['frames']} frames; H-O-H {r['hoh_angle_mean_deg']:.2f} +- {r['hoh_angle_std_deg']:.2f} deg; "
              f"H-H intra {r['hh_intra_mean_angstrom']:.3f} Å, g_HH first peak {r['g_hh_first_peak_angstrom']:.2f} Å; "
              f"O-H {r['oh_bond_mean_angstrom']:.3f} Å; H3O+ {r['h3o_per_frame']:.2f}, OH- {r['oh_minus_per_frame']:.2f} "
              f"per frame; failing frames {r['frames_failing']} (first {r['first_failing_frame']}); "
              f"O-O min {r['oo_min_angstrom']:.2f} Å")


if __name__ == "__main__":
    main()
