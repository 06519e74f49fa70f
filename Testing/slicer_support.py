"""Real MRML scenes for pytest, from PyPI's ``slicer-core`` (Kitware's MRML build without Qt), and the module loader.

How slicer-core exposes Slicer (checked on slicer-core 5.13.31053.0, VTK 9.6):
- ``import slicer`` is a namespace "meta-package": ``slicer/__init__.py`` imports every ``slicer/slicer_*.py`` jump
  pad and copies their public names onto ``slicer``. slicer-core's jump pad is ``slicer/slicer_core.py``
  (``from slicer_core import *``), and the ``slicer_core`` package loads the wrapped libraries: MRMLCore, MRMLLogic,
  MRMLCLI, MRMLDisplayableManager, vtkSegmentationCore, vtkITK, vtkTeem, vtkAddon and the module logics/MRML of
  Colors, Segmentations, Volumes, Markups, SubjectHierarchy, Terminologies, Sequences, Transforms, ...
  So ``slicer.vtkMRMLScene``, ``slicer.vtkSlicerApplicationLogic``, ``slicer.vtkSlicerSegmentationsModuleLogic``,
  ``slicer.vtkOrientedImageData``, ``slicer.vtkSegmentation`` all exist, as does ``slicer.util`` (the application's
  own ``util.py``; its array helpers work, everything touching ``slicer.app``/``slicer.mrmlScene``/``slicer.modules``
  does not).
- Absent: ``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules``, ``slicer.ScriptedLoadableModule``, ``qt``,
  ``ctk``, ``sitkUtils`` — hence the module file defines its GUI classes only when Qt imports, and everything else
  lives in ``MixupPrivacyLib``.
- ``vtk`` is the VTK 9.6 wheel it depends on; ``vtk.util.numpy_support`` works.

Scene recipe (what ``qSlicerCoreApplication`` does at startup, minus Qt):
- ``vtkSlicerApplicationLogic().SetMRMLScene(scene)``; its ``GetColorLogic()`` (a ``vtkMRMLColorLogic``) then
  ``SetMRMLScene(scene)`` adds the default colour tables (``vtkMRMLColorTableNodeGrey``, ...) that volume display
  nodes reference. (The file-based tables such as GenericAnatomyColors need the application's share directory and
  are not available.)
- ``vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)`` (plus the application logic), registered as the
  "Segmentations" module logic: it registers the segmentation converter rules and node classes; without it segment
  operations silently do nothing.
The logics only live as long as a Python reference to them, so ``SlicerCoreScene`` keeps them.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "MixupPrivacy"
MODULE_FILE = MODULE_DIR / "MixupPrivacy.py"
WATERMARK_MODULE_DIR = REPO_ROOT / "MedLockerWatermark"
OBFUSCATION_MODULE_DIR = REPO_ROOT / "ObfuscationPrivacy"


@dataclass
class SlicerCoreScene:
    scene: Any
    application_logic: Any
    segmentations_logic: Any

    def close(self) -> None:
        # Detaching the logics first only makes the segmentations logic warn about a missing scene.
        self.scene.Clear(True)


def make_scene() -> SlicerCoreScene:
    """A fresh MRML scene with the application, colour and segmentations logics attached."""
    import slicer

    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    application_logic.GetColorLogic().SetMRMLScene(scene)

    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    segmentations_logic.SetMRMLApplicationLogic(application_logic)
    application_logic.SetModuleLogic("Segmentations", segmentations_logic)
    return SlicerCoreScene(scene, application_logic, segmentations_logic)


def load_module(module_dir: Path = MODULE_DIR) -> ModuleType:
    """Import a scripted module file (default MixupPrivacy/MixupPrivacy.py) under its Slicer name, as Slicer's
    scripted module loader does.

    Slicer puts each scripted module's folder on ``sys.path``; the module file relies on that to import its
    ``<Name>Lib`` beside it, so the same is done here.
    """
    module_dir = Path(module_dir)
    module_file = module_dir / f"{module_dir.name}.py"
    if str(module_dir) not in sys.path:
        sys.path.insert(0, str(module_dir))
    name = module_file.stem
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == module_file:
        return module
    spec = importlib.util.spec_from_file_location(name, module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
