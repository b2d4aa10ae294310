"""The wheel installs and runs on its own; the example plugin installs and its probe runs."""

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

TINY = """
version: 1
model: {kind: mlp, with: {in: 3, hidden: [4], out: 2}}
data: {kind: gaussian_mixture, with: {n: 30, in: 3, classes: 2}}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1}, steps: 5, checkpoints: {at: [0, 5]}}
probes:
  - {name: eval, probe: evaluate}
  %s
output: out.zarr
"""


def _venv(path: Path) -> tuple[Path, Path]:
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    python = path / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    return python, site


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *map(str, args)], check=True)


def test_wheel_has_every_package_and_runs_from_its_own_install(tmp_path):
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("basinprobe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in ("basinprobe/registry/hookspecs.py", "basinprobe/runtime/cli.py", "basinprobe/probes/evaluate.py",
                   "basinprobe/runtime/substrate/__init__.py", "basinprobe/specs/basinprobe.schema.json",
                   "basinprobe/specs/examples/quickstart.yaml"):
        assert member in names, member
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "basinprobe = basinprobe.runtime.cli:main" in text and "builtin = basinprobe.probes" in text

    python, site = _venv(tmp_path / "venv")
    _pip("install", "--no-deps", "--no-index", "--target", site, wheel)
    (tmp_path / "spec.yaml").write_text(TINY % "")
    # -S: skip .pth files, so an editable install of the checkout cannot shadow the wheel.
    system_sites = [p for p in sys.path if p.endswith("site-packages")]
    code = ("import sys; sys.path[:0] = %r; import basinprobe.runtime as r, basinprobe.registry as g; "
            "print(r.__file__); from basinprobe.runtime.cli import main; sys.exit(main(['run', 'spec.yaml', '-q']))"
            % ([str(site), *system_sites],))
    done = subprocess.run([str(python), "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(str(site)), done.stdout
    assert (tmp_path / "out.zarr" / "eval" / "zarr.json").is_file()


def test_example_plugin_installs_and_its_probe_runs(tmp_path):
    python, site = _venv(tmp_path / "venv")
    _pip("install", "--no-deps", "--no-build-isolation", "--target", site, REPO / "plugins" / "basinprobe-weightnorms")
    run = lambda *args: subprocess.run([str(python), "-m", "basinprobe.runtime.cli", *args], cwd=tmp_path,
                                       capture_output=True, text=True)
    listing = run("probes")
    assert listing.returncode == 0, listing.stderr
    line = next(l for l in listing.stdout.splitlines() if "weight_norms" in l)
    assert "basinprobe-weightnorms" in line
    (tmp_path / "spec.yaml").write_text(TINY % "- {name: norms, probe: weight_norms, with: {relative: true}}")
    done = run("run", "spec.yaml", "-q")
    assert done.returncode == 0, done.stderr
    check = subprocess.run([str(python), "-c", """
import json, numpy as np, torch, basinprobe.runtime as r
t = r.open_results('out.zarr')
norms = t['norms']
assert norms.attrs['plugin'] == 'basinprobe-weightnorms', norms.attrs
assert norms['norm'].dims == ('checkpoint', 'layer')
assert list(norms['layer'].values) == ['0.weight', '0.bias', '2.weight', '2.bias']
assert (norms['distance_from_init'].sel(checkpoint=0) == 0).all()
assert (norms['distance_from_init'].sel(checkpoint=5) > 0).all()
p = t['_checkpoints']['params'].sel(checkpoint=5).values
assert np.isclose(norms['norm'].sel(checkpoint=5, layer='0.weight'), np.linalg.norm(p[:12]))
print('ok')
"""], cwd=tmp_path, capture_output=True, text=True)
    assert check.stdout.strip() == "ok", check.stderr
    # the plugin's with: schema is merged into validation
    (tmp_path / "bad.yaml").write_text(TINY % "- {probe: weight_norms, with: {relativ: true}}")
    bad = run("validate", "bad.yaml")
    assert bad.returncode == 2 and "did you mean 'relative'" in bad.stderr
