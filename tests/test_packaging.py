"""A normal (non-editable) `pip install .`: the sample data the scripts default to, and the model card template,
ship inside the package."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import dataclasses, json, shutil, sys
    from pathlib import Path
    import datasets_scripts
    from modeling_refers.training import pretraining

    site = Path(sys.argv[1]).resolve()
    default = next(f.default for f in dataclasses.fields(pretraining.DataArguments) if f.name == "data_dir")
    out = {"module": datasets_scripts.__file__, "sample": str(datasets_scripts.SAMPLE_DATA_DIR), "default": default,
           "inside": Path(default).resolve().is_relative_to(site),
           "files": sorted(str(p.relative_to(datasets_scripts.SAMPLE_DATA_DIR))
                           for p in datasets_scripts.SAMPLE_DATA_DIR.rglob("*") if p.is_file()),
           "checked": str(datasets_scripts.check_data_dir(default))}
    from modeling_refers.hub.model_card import make_model_card  # its Jinja template is package data too
    out["card"] = make_model_card(None, model_name="installed").text.splitlines()[1]
    shutil.rmtree(datasets_scripts.SAMPLE_DATA_DIR)  # an installation without the sample: the error says what to pass
    try:
        datasets_scripts.check_data_dir(default)
    except FileNotFoundError as err:
        out["error"] = str(err)
    print(json.dumps(out))
    """
)


def test_non_editable_install_ships_the_sample_data_of_the_default_data_dir(tmp_path, repo_root):
    # pip builds in the source folder (build/, *.egg-info): build from a copy of the tracked files, not the checkout.
    tracked = subprocess.run(["git", "ls-files", "-z", "setup.py", "README.md", "modeling_refers", "datasets_scripts",
                              "sample_data"], cwd=repo_root, capture_output=True, check=True).stdout.decode()
    source = tmp_path / "src"
    for name in filter(None, tracked.split("\0")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / name, source / name)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--no-compile", "--disable-pip-version-check", "-q", "--target", str(site), str(source)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert pip.returncode == 0, pip.stderr[-3000:]

    # The installed copy, not the checkout: run outside it with the target first on the path (the editable
    # install's finder comes after the path).
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", CHILD, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["module"] == str(site / "datasets_scripts" / "__init__.py")
    assert out["sample"] == str(site / "datasets_scripts" / "sample_data")
    assert out["default"] == str(site / "datasets_scripts" / "sample_data" / "covid19_collection")
    assert out["inside"] and out["checked"] == out["default"]
    assert out["card"] == "# installed"
    shipped = sorted(os.path.relpath(name, "sample_data") for name in filter(None, tracked.split("\0"))
                     if name.startswith("sample_data/"))
    assert out["files"] == shipped  # every tracked file of sample_data/, nothing else (no caches)
    assert out["error"] == (
        f"--data_dir {out['default']!r}: no such folder; pass --data_dir with the data set's folder (the default is "
        f"the sample data shipped with refers, and this installation has no {out['sample']!r}: install refers with "
        "`pip install .` from a checkout, or pass your own data)")
