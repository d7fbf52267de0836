"""Where only JAX is installed (an accelerator image): the model, configs and train step import.

Each check runs in a subprocess whose import system refuses `tensorflow` and
`tensorflow_datasets`, as a Python without them would.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax_env

ROOT = Path(__file__).resolve().parents[1]

# Runs argv[1:] as `python argv[1] ...` with TensorFlow unimportable.
_WITHOUT_TF = """
import importlib.abc, runpy, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.partition(".")[0])

sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
if sys.argv[0] == "-c":
    exec(sys.argv[1])
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_TF, *args], env=jax_env.subprocess_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_package_imports_and_says_what_reading_data_needs():
    done = _run("-c", """
import sys, jax, vit
from vit import train_step, config_schema
assert "tensorflow" not in sys.modules
model = vit.create_model("Ti/16", num_classes=10, image_size=32, depth=1)
print(vit.count_params(model))
import configs.imagenet
config_schema.validate_config(configs.imagenet.get_config("B/16"))
assert "tensorflow" not in sys.modules
try:
    vit.evaluate
except ImportError as err:
    print("ImportError:", err)
""")
    assert done.returncode == 0, done.stderr[-3000:]
    count, error = done.stdout.strip().splitlines()[-2:]
    assert int(count) > 0
    assert error == ("ImportError: vit.evaluate reads images, which needs tensorflow: install the "
                     "package with its dependencies (pip install -e .)")


def test_the_trainer_step_benchmark_runs():
    done = _run(str(ROOT / "bench" / "train_mfu.py"), str(ROOT / "configs" / "smoke.py"),
                "--steps", "1", "--warmup", "0", "--peak_tflops", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "train_mfu" and line["images_per_s"] > 0
    assert line["model_flops_per_image"] > 0
