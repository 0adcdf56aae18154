"""A non-editable install (`pip install .`) carries what the commands read: the configs, as cammsr_configs."""
import os
import subprocess

from conftest import PY, ROOT

CHECK = """
import launch, launch.quickstart as quickstart
from train.config import load_config
assert launch.__file__.startswith({target!r}), launch.__file__
cfg = load_config(quickstart.CONFIG, ["data.path=somewhere"])
print("config", quickstart.CONFIG, cfg.model.name, cfg.train.max_epochs)
"""


def test_installed_package_finds_the_quickstart_config_outside_the_source_tree(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                              str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([PY, "-c", CHECK.format(target=str(target))], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"config {target / 'cammsr_configs' / 'quickstart.yaml'} cammsr 40" in proc.stdout
