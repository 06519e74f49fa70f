"""The MNI152 template the model grid is defined on ships in Resources/Template: no nilearn at run time, and a
changed or missing file is refused with a one-line error rather than silently moving the grid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

# Runs in a fresh interpreter where importing (or even finding) nilearn fails, as on a Slicer without it.
_WITHOUT_NILEARN = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoNilearn(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "nilearn" or name.startswith("nilearn."):
                raise ImportError("nilearn is not installed here")
            return None

    sys.meta_path.insert(0, _NoNilearn())
    from medprivacy.data.synth import synthesize_subject
    from medprivacy.data.template import load_template
    template = load_template()
    subject = synthesize_subject(900000)
    print(template.shape, subject.image.shape)
    """
)


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_template_and_synthetic_subjects_load_without_nilearn():
    result = _run(_WITHOUT_NILEARN)
    assert result.returncode == 0, result.stderr
    assert "(189, 233, 197)" in result.stdout


def test_changed_template_file_is_refused_in_one_line(tmp_path):
    copy = tmp_path / "Template"
    shutil.copytree(REPO_ROOT / "Resources" / "Template", copy)
    t1 = copy / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    data = bytearray(t1.read_bytes())
    data[-10] ^= 0xFF
    t1.write_bytes(bytes(data))
    code = "from medprivacy.data.template import load_template\nload_template()"
    result = _run(code, {"MEDPRIVACY_TEMPLATE_DIR": str(copy)})
    assert result.returncode != 0
    assert "checksum differs" in result.stderr and "restore it from git or reinstall" in result.stderr


def test_missing_template_file_names_the_fix(tmp_path):
    copy = tmp_path / "Template"
    shutil.copytree(REPO_ROOT / "Resources" / "Template", copy)
    (copy / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").unlink()
    result = _run(
        "from medprivacy.data.template import load_template\nload_template()", {"MEDPRIVACY_TEMPLATE_DIR": str(copy)}
    )
    assert result.returncode != 0
    assert "is missing; reinstall the MedPrivacy extension" in result.stderr


def test_template_licence_ships_beside_the_files():
    notice = (REPO_ROOT / "Resources" / "Template" / "LICENSE.txt").read_text()
    assert "McConnell Brain Imaging Centre" in notice and "Permission to use, copy, modify, and distribute" in notice
